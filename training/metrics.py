"""Quality measures for evaluation: PSNR on 8-bit pictures and MS-SSIM (Wang et al. 2003) in torch."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Wang, Simoncelli & Bovik (2003): weights of the five scales, Gaussian window 11, sigma 1.5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def mse_uint8(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def psnr_from_mse(m: float) -> float:
    return 100.0 if m <= 1e-10 else 10.0 * math.log10(255.0 ** 2 / m)  # 100 dB stands for "identical"


def summarize_psnr(mses: list[float]) -> dict[str, float]:
    """Both ways of averaging, named apart: the mean of per-frame PSNRs, and the PSNR of the mean MSE."""
    return {"psnr_mean_of_frames": float(np.mean([psnr_from_mse(m) for m in mses])),
            "psnr_of_mean_mse": psnr_from_mse(float(np.mean(mses)))}


def _gaussian_taps(dtype: torch.dtype) -> torch.Tensor:
    t = torch.arange(WINDOW, dtype=dtype) - (WINDOW - 1) / 2
    g = torch.exp(-(t ** 2) / (2 * SIGMA ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian, 'valid' borders, every (picture, channel) plane as its own batch item."""
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, w)
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    x = F.conv2d(x, taps.view(1, 1, -1, 1))
    return x.reshape(n, c, x.shape[-2], x.shape[-1])


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, taps: torch.Tensor, peak: float) -> tuple[torch.Tensor, torch.Tensor]:
    c1, c2 = (K1 * peak) ** 2, (K2 * peak) ** 2
    n = x.shape[0]
    mx, my, exx, eyy, exy = _blur(torch.cat([x, y, x * x, y * y, x * y]), taps).split(n)  # one pass for all five
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).flatten(2).mean(-1), cs.flatten(2).mean(-1)  # (N, C) each


def ms_ssim(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, peak: float = 255.0) -> torch.Tensor:
    """MS-SSIM of pictures (N, C, H, W) (or one uint8 HxWx3 array each), one value per picture,
    averaged over channels. Five scales need sides of at least 161 px; smaller pictures use as
    many scales as fit, with the weights of those scales renormalised to sum to 1."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, copy=True)).permute(2, 0, 1)[None]
        y = torch.from_numpy(np.array(y, copy=True)).permute(2, 0, 1)[None]
    x, y = x.float(), y.float()  # float32 is ample: c2 = (0.03*255)^2 dwarfs its rounding
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    side = min(x.shape[-2:])
    if side < WINDOW:
        raise ValueError(f"pictures of side {side} are smaller than the {WINDOW}-px SSIM window")
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side // (2 ** scales) >= WINDOW:
        scales += 1
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32)
    weights = weights / weights.sum()
    w = _gaussian_taps(torch.float32)
    values = []
    for s in range(scales):
        ssim, cs = _ssim_terms(x, y, w, peak)
        values.append(torch.relu(ssim if s == scales - 1 else cs))  # relu: no negative base to a power
        if s < scales - 1:
            x = F.avg_pool2d(x, 2)
            y = F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=0)  # (scales, N, C)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean(-1)
