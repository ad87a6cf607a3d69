"""Anti-aliased downsampling of frames before they reach the encoder.

First Order Motion Model (FOMM) shrinks its input with a Gaussian blur followed by keeping
every s-th pixel ("AntiAliasInterpolation2d"). This module holds:

* `fomm_reference` / `FommReference` — a slow, literal re-implementation of that module
  (k×k depthwise convolution over the *whole* zero-padded frame, then ``[::s, ::s]``). It is the
  ground truth for the tests and the benchmark, not for production use.
* `AntiAliasDownsample` — the same function computed fast: the 2-D Gaussian is separable, so
  we run two 1-D passes and evaluate each pass only at the kept positions (stride s). Each
  pass is a batch of small matrix–vector products over strided *views* of the input (no
  padding copy, no im2col); the few outputs whose window hangs over the border get a small
  dense matrix with the out-of-frame taps removed, which is exactly what zero padding does.
* `downsample` / `METHODS` — the alternatives compared in the anti-alias study, by name.
* Frame helpers for the sender: `downsample_frame`, `centre_crop`, `crop_side_for`.

Output size. With an odd kernel the reference pads by k//2 on every side, so its convolution
keeps the frame size and ``[::s]`` leaves ``ceil(H/s) × ceil(W/s)`` pixels. Every method here
returns that same size (it equals ``H//s × W//s`` when s divides the frame, the normal case
after `centre_crop`), so methods are interchangeable:

* ``gaussian``, ``subsample``, ``median``, ``bilateral`` sample the grid 0, s, 2s, … (a pixel
  and its filtered neighbourhood), like the reference.
* ``nearest``, ``bilinear``, ``bicubic``, ``area`` resample the whole frame onto the output
  grid with `F.interpolate(size=...)`; when s does not divide the frame their effective factor
  is ``H / ceil(H/s)``, slightly less than s.
* ``avgpool`` uses s×s windows with ``ceil_mode=True``; a clipped last window averages only
  the pixels inside the frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamer.errors import FrameSizeError

__all__ = [
    "METHODS",
    "AntiAliasDownsample",
    "BILATERAL_SIGMA_COLOR",
    "FommReference",
    "bilateral_params",
    "centre_crop",
    "crop_side_for",
    "downsample",
    "downsample_frame",
    "fomm_reference",
    "inverse_scale",
    "median_window",
    "output_size",
]

# Relative tolerance when deciding that 1/scale is an integer (1/3 is not exact in binary).
_INV_SCALE_RTOL = 1e-6


def inverse_scale(scale: float) -> int:
    """Return the integer s with ``scale == 1/s``; raise `ValueError` for any other scale."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number 1/s for an integer s >= 1, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0 or scale > 1.0:
        raise ValueError(
            f"scale must be 1/s for an integer s >= 1 (e.g. 1, 0.5, 0.25), got {scale!r}"
        )
    inv = 1.0 / scale
    s = round(inv)
    if abs(inv - s) > _INV_SCALE_RTOL * inv:
        raise ValueError(
            f"scale must be 1/s for an integer s >= 1 (e.g. 0.5, 1/3, 0.25); got {scale!r}, "
            f"whose inverse {inv:.6g} is not an integer"
        )
    return s


def output_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size every method returns for a ``height × width`` input: ``(ceil(H/s), ceil(W/s))``."""
    s = inverse_scale(scale)
    return (-(-height // s), -(-width // s))


def _kernel_geometry(scale: float) -> tuple[float, int, int, int]:
    """FOMM's (sigma, kernel_size, pad_before, pad_after) for a scale."""
    sigma = (1.0 / scale - 1.0) / 2.0
    kernel_size = 2 * round(sigma * 4) + 1
    ka = kernel_size // 2
    kb = ka - 1 if kernel_size % 2 == 0 else ka
    return sigma, kernel_size, ka, kb


# ---------------------------------------------------------------------------------------------
# Reference (slow): the FOMM module as published. Used only by tests and the benchmark.
# ---------------------------------------------------------------------------------------------


class FommReference(nn.Module):
    """REFERENCE ONLY — FOMM's AntiAliasInterpolation2d, computed the slow, literal way.

    Builds a (C,1,k,k) depthwise Gaussian, zero-pads by (ka, kb) on each side, convolves the
    full-resolution frame and keeps every s-th pixel with ``s = int(1/scale)`` (truncation, as
    FOMM does). ``scale == 1`` returns the input unchanged. The kernel is built in float32 like
    the original and cast to the input's dtype so float64 inputs give an exact ground truth.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.groups = channels
        sigma, kernel_size, self.ka, self.kb = _kernel_geometry(scale)
        # Product of two 1-D Gaussians on a meshgrid, normalised to sum 1 (as in FOMM).
        grids = torch.meshgrid(
            torch.arange(kernel_size, dtype=torch.float32),
            torch.arange(kernel_size, dtype=torch.float32),
            indexing="ij",
        )
        mean = (kernel_size - 1) / 2
        kernel = torch.ones(kernel_size, kernel_size)
        for grid in grids:
            kernel = kernel * torch.exp(-((grid - mean) ** 2) / (2 * sigma**2))
        kernel = kernel / torch.sum(kernel)
        kernel = kernel.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1)
        self.register_buffer("weight", kernel)
        self.int_inv_scale = int(1 / scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale == 1.0:
            return x
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight.to(x.dtype), groups=self.groups)
        s = self.int_inv_scale
        return out[:, :, ::s, ::s]


def fomm_reference(x: Tensor, scale: float) -> Tensor:
    """REFERENCE ONLY — FOMM's anti-alias downsample of ``x`` (N,C,H,W); see `FommReference`."""
    return FommReference(x.shape[1], scale).to(x.device)(x)


# ---------------------------------------------------------------------------------------------
# Fast separable implementation.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pass:
    """How to evaluate one strided, zero-padded 1-D pass over an axis of length n.

    Output i is ``sum_t taps[t] * in[i*s - ka + t]`` with out-of-range inputs counted as 0.
    Outputs ``lo..hi`` have their whole window inside the axis and are computed as a batch of
    dot products over strided views; the rest use small dense matrices (top/bottom rows of
    the band matrix, restricted to the columns they touch).
    """

    n: int
    n_out: int
    s: int
    k: int
    lo: int  # first interior output (inclusive); lo > hi means there is no interior
    hi: int  # last interior output (inclusive)
    taps: Tensor  # (k,)
    top: Tensor | None  # (lo, top_cols) rows of the band matrix
    top_cols: int
    bottom: Tensor | None  # (n_out - hi - 1, n - bottom_col0)
    bottom_col0: int


def _make_pass(n: int, s: int, taps64: Tensor, dtype: torch.dtype, device: torch.device) -> _Pass:
    k = taps64.numel()
    ka = k // 2
    n_out = (n - 1) // s + 1
    # Full band matrix in float64: tiny (n_out × n) and built once per axis length.
    band = torch.zeros(n_out, n, dtype=torch.float64)
    for i in range(n_out):
        start = i * s - ka
        a, b = max(start, 0), min(start + k, n)
        band[i, a:b] = taps64[a - start : b - start]
    lo = -(-ka // s)
    hi = min(n_out - 1, (n - k + ka) // s)
    if lo > hi:  # axis shorter than one kernel: everything is "border"
        lo, hi = 0, -1
        top, top_cols = band, n
        bottom, bottom_col0 = None, n
    else:
        top_cols = min(n, (lo - 1) * s - ka + k) if lo > 0 else 0
        top = band[:lo, :top_cols] if lo > 0 else None
        bottom_col0 = max(0, (hi + 1) * s - ka)
        bottom = band[hi + 1 :, bottom_col0:] if hi < n_out - 1 else None

    def conv(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype=dtype, device=device).contiguous()

    return _Pass(
        n=n,
        n_out=n_out,
        s=s,
        k=k,
        lo=lo,
        hi=hi,
        taps=taps64.to(dtype=dtype, device=device),
        top=conv(top),
        top_cols=top_cols,
        bottom=conv(bottom),
        bottom_col0=bottom_col0,
    )


def _reduce_rows(x: Tensor, p: _Pass) -> Tensor:
    """(B, n, m) contiguous → (B, n_out, m): filter + subsample along dim 1."""
    B, n, m = x.shape
    out = x.new_empty(B, p.n_out, m)
    n_int = p.hi - p.lo + 1
    if n_int > 0:
        r0 = p.lo * p.s - p.k // 2  # first input row of the first interior window
        if n % p.s == 0 and B > 1:
            # Rows of consecutive images sit at a uniform stride s in memory, so one batched
            # product covers every image; windows straddling two images land on border rows,
            # which are overwritten below.
            total = (B - 1) * p.n_out + n_int
            win = x.as_strided((total, p.k, m), (p.s * m, m, 1), x.storage_offset() + r0 * m)
            w = p.taps.view(1, 1, p.k).expand(total, 1, p.k)
            flat = out.view(B * p.n_out, 1, m)
            torch.bmm(w, win, out=flat[p.lo : p.lo + total])
        else:
            w = p.taps.view(1, 1, p.k).expand(n_int, 1, p.k)
            for b in range(B):
                xb = x[b]
                win = xb.as_strided((n_int, p.k, m), (p.s * m, m, 1), xb.storage_offset() + r0 * m)
                torch.bmm(w, win, out=out[b, p.lo : p.hi + 1].unsqueeze(1))
    if p.top is not None:
        out[:, : p.top.shape[0]] = torch.matmul(p.top, x[:, : p.top_cols])
    if p.bottom is not None:
        out[:, p.hi + 1 :] = torch.matmul(p.bottom, x[:, p.bottom_col0 :])
    return out


def _reduce_cols(y: Tensor, p: _Pass) -> Tensor:
    """(R, n) contiguous → (n_out, R): filter + subsample along dim 1, result transposed.

    Interior output column j is ``taps (1×k) @ window_j (k×R)`` where window_j is a
    column-major view (element stride 1 along k, n along R) of the input; all of them form a
    single batched product without copying the input. (The row-major (R×k)@(k×1) form of the
    same product is ~5× slower in torch's CPU bmm.)
    """
    R, n = y.shape
    out_t = y.new_empty(p.n_out, R)
    n_int = p.hi - p.lo + 1
    if n_int > 0:
        c0 = p.lo * p.s - p.k // 2
        win = y.as_strided((n_int, p.k, R), (p.s, 1, n), y.storage_offset() + c0)
        w = p.taps.view(1, 1, p.k).expand(n_int, 1, p.k)
        torch.bmm(w, win, out=out_t[p.lo : p.hi + 1].unsqueeze(1))
    if p.top is not None:
        out_t[: p.top.shape[0]] = torch.matmul(p.top, y[:, : p.top_cols].t())
    if p.bottom is not None:
        out_t[p.hi + 1 :] = torch.matmul(p.bottom, y[:, p.bottom_col0 :].t())
    return out_t


class AntiAliasDownsample(nn.Module):
    """FOMM's Gaussian anti-alias downsample, computing only the pixels that are kept.

    Same output as `fomm_reference` (to float32 rounding: ≤ 1e-6 on inputs in [0, 1]) for any
    ``scale = 1/s`` with integer s ≥ 1, including the zero-padded borders and sizes that s does
    not divide (output ``ceil(H/s) × ceil(W/s)``). Input: floating tensor (N, C, H, W) with
    C == ``channels``. ``scale == 1`` returns the input itself, as FOMM does.

    Without autograd the two 1-D passes run as batched dot products over strided views (see
    module docstring); when the input requires grad, two strided depthwise convolutions with
    (1,k) and (k,1) kernels compute the same thing differentiably.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.channels = channels
        self.scale = float(scale)
        self.s = inverse_scale(scale)
        sigma, self.kernel_size, self.ka, _ = _kernel_geometry(self.scale)
        k = self.kernel_size
        # 1-D taps in float64 so the separable product matches the 2-D kernel to ~1e-16.
        if self.s == 1:
            taps = torch.ones(1, dtype=torch.float64)
        else:
            t = torch.arange(k, dtype=torch.float64)
            taps = torch.exp(-((t - (k - 1) / 2) ** 2) / (2 * sigma**2))
            taps = taps / taps.sum()
        self.register_buffer("taps64", taps, persistent=False)
        self._passes: dict[tuple[int, torch.dtype, torch.device], _Pass] = {}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale:g}, kernel_size={self.kernel_size}"

    def _pass(self, n: int, dtype: torch.dtype, device: torch.device) -> _Pass:
        key = (n, dtype, device)
        p = self._passes.get(key)
        if p is None:
            p = _make_pass(n, self.s, self.taps64.cpu(), dtype, device)
            self._passes[key] = p
        return p

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected a (N, {self.channels}, H, W) tensor, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
        if self.s == 1:
            return x
        if x.requires_grad and torch.is_grad_enabled():
            return self._forward_conv(x)
        N, C, H, W = x.shape
        if x.numel() == 0:
            return x.new_empty(N, C, *output_size(H, W, self.scale))
        pv = self._pass(H, x.dtype, x.device)
        ph = self._pass(W, x.dtype, x.device)
        # Vertical first: it touches every input pixel once and shrinks the data s-fold, so
        # the horizontal pass works on a quarter (s=4) of the frame.
        y = _reduce_rows(x.reshape(N * C, H, W).contiguous(), pv)
        z_t = _reduce_cols(y.view(N * C * pv.n_out, W), ph)  # (Wo, N*C*Ho)
        return z_t.t().reshape(N, C, pv.n_out, ph.n_out)

    def _forward_conv(self, x: Tensor) -> Tensor:
        k, C = self.kernel_size, self.channels
        taps = self.taps64.to(dtype=x.dtype, device=x.device)
        w_v = taps.view(1, 1, k, 1).expand(C, 1, k, 1)
        w_h = taps.view(1, 1, 1, k).expand(C, 1, 1, k)
        y = F.conv2d(x, w_v, stride=(self.s, 1), padding=(self.ka, 0), groups=C)
        return F.conv2d(y, w_h, stride=(1, self.s), padding=(0, self.ka), groups=C)


# ---------------------------------------------------------------------------------------------
# Alternatives from the study, selectable by name.
# ---------------------------------------------------------------------------------------------

_GAUSSIAN_CACHE: dict[tuple[int, int], AntiAliasDownsample] = {}


def _gaussian(x: Tensor, s: int) -> Tensor:
    key = (x.shape[1], s)
    mod = _GAUSSIAN_CACHE.get(key)
    if mod is None:
        mod = AntiAliasDownsample(x.shape[1], 1.0 / s)
        _GAUSSIAN_CACHE[key] = mod
    return mod(x)


def _subsample(x: Tensor, s: int) -> Tensor:
    return x[:, :, ::s, ::s].contiguous()


def _size(x: Tensor, s: int) -> tuple[int, int]:
    return (-(-x.shape[2] // s), -(-x.shape[3] // s))


def _nearest(x: Tensor, s: int) -> Tensor:
    return F.interpolate(x, size=_size(x, s), mode="nearest")


def _bilinear(x: Tensor, s: int) -> Tensor:
    return F.interpolate(x, size=_size(x, s), mode="bilinear", align_corners=False, antialias=True)


def _bicubic(x: Tensor, s: int) -> Tensor:
    # Bicubic overshoots a little at sharp edges; callers that need [0, 1] clamp
    # (`downsample_frame` does).
    return F.interpolate(x, size=_size(x, s), mode="bicubic", align_corners=False, antialias=True)


def _area(x: Tensor, s: int) -> Tensor:
    return F.interpolate(x, size=_size(x, s), mode="area")


def _avgpool(x: Tensor, s: int) -> Tensor:
    return F.avg_pool2d(x, kernel_size=s, stride=s, ceil_mode=True)


def _pad_same(x: Tensor, r: int) -> Tensor:
    # Reflect needs the pad to be shorter than the side; tiny frames fall back to replicate.
    mode = "reflect" if r < x.shape[2] and r < x.shape[3] else "replicate"
    return F.pad(x, (r, r, r, r), mode=mode)


def _windows(x: Tensor, window: int, s: int) -> Tensor:
    """(N,C,H,W) → (N, C, Ho, Wo, window²): neighbourhoods of the kept pixels (0, s, 2s, …).

    This is ``F.unfold(padded, window, stride=s)`` laid out with the window last (a strided
    view copied once), so the reductions below run over contiguous memory. Only windows of
    kept pixels are materialised (s² fewer than filter-then-subsample).
    """
    N, C, H, W = x.shape
    Ho, Wo = _size(x, s)
    p = _pad_same(x, window // 2)
    sn, sc, sh, sw = p.stride()
    view = p.as_strided((N, C, Ho, Wo, window, window), (sn, sc, sh * s, sw * s, sh, sw))
    return view.reshape(N, C, Ho, Wo, window * window)


def median_window(s: int) -> int:
    """Median window side for factor s: the smallest odd number ≥ s (s=2→3, 3→3, 4→5, 8→9)."""
    return s | 1


def _median(x: Tensor, s: int) -> Tensor:
    # Odd window so the median is a single middle value (torch would take the lower one of
    # an even count); kthvalue on the contiguous last dim is the fastest exact selection.
    w = median_window(s)
    return _windows(x, w, s).kthvalue((w * w) // 2 + 1, dim=-1).values


# Range sigma of the bilateral filter, on [0, 1] pixel values, using RGB Euclidean distance.
BILATERAL_SIGMA_COLOR = 0.1


def bilateral_params(s: int) -> tuple[int, float]:
    """(window side, spatial sigma) of the bilateral filter for factor s.

    Spatial sigma is FOMM's ``(s - 1)/2`` (1.5 at s=4) so that, with a very large colour
    sigma, the filter becomes the same Gaussian; the window covers ±2 sigma (7×7 at s=4).
    """
    sigma = max((s - 1) / 2.0, 0.5)
    return 2 * math.ceil(2 * sigma) + 1, sigma


def _bilateral(x: Tensor, s: int, sigma_color: float = BILATERAL_SIGMA_COLOR) -> Tensor:
    w, sigma = bilateral_params(s)
    patches = _windows(x, w, s)  # (N, C, Ho, Wo, w²)
    centre = patches[..., (w * w) // 2 :][..., :1]
    # Colour distance is joint over channels, so all channels share one weight per tap.
    dist2 = (patches - centre).square().sum(dim=1, keepdim=True)  # (N, 1, Ho, Wo, w²)
    r = torch.arange(w, dtype=x.dtype, device=x.device) - w // 2
    d2 = r.view(-1, 1) ** 2 + r.view(1, -1) ** 2
    spatial = torch.exp(-d2 / (2 * sigma**2)).reshape(-1)
    weights = torch.exp(dist2 * (-1.0 / (2 * sigma_color**2))).mul_(spatial)
    return (patches * weights).sum(dim=-1) / weights.sum(dim=-1)


METHODS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "gaussian": _gaussian,
    "subsample": _subsample,
    "nearest": _nearest,
    "bicubic": _bicubic,
    "bilinear": _bilinear,
    "area": _area,
    "avgpool": _avgpool,
    "median": _median,
    "bilateral": _bilateral,
}
"""Method name → ``fn(x, s)`` on an (N,C,H,W) float tensor with integer factor s ≥ 2.
Use `downsample`, which validates the arguments and handles s = 1 and (C,H,W) inputs."""


def downsample(x: Tensor, scale: float, method: str = "gaussian") -> Tensor:
    """Shrink ``x`` ((N,C,H,W) or (C,H,W), floating) by ``scale = 1/s`` with a named method.

    Output is ``ceil(H/s) × ceil(W/s)`` for every method (see the module docstring for what
    each one samples). ``scale == 1`` returns ``x`` unchanged. Raises `ValueError` for an
    unknown method, a scale that is not 1/integer, or a tensor of the wrong rank/dtype.
    """
    fn = METHODS.get(method)
    if fn is None:
        raise ValueError(f"unknown downsample method {method!r}; valid: {', '.join(METHODS)}")
    s = inverse_scale(scale)
    if x.dim() not in (3, 4):
        raise ValueError(f"expected an (N,C,H,W) or (C,H,W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
    if s == 1:
        return x
    if x.dim() == 3:
        return fn(x.unsqueeze(0), s).squeeze(0)
    return fn(x, s)


# ---------------------------------------------------------------------------------------------
# Frame helpers (numpy HxWxC uint8, as the sender captures them).
# ---------------------------------------------------------------------------------------------


def downsample_frame(frame: np.ndarray, scale: float, method: str = "gaussian") -> np.ndarray:
    """Downsample an HxWxC uint8 frame; returns a contiguous uint8 ``ceil(H/s)×ceil(W/s)×C``.

    Works on [0, 1] floats internally, then rounds and clips back to 0..255.
    """
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3:
        if isinstance(frame, np.ndarray):
            desc = f"a {frame.dtype} array of shape {frame.shape}"
        else:
            desc = type(frame).__name__
        raise FrameSizeError(f"expected an HxWxC uint8 frame, got {desc}")
    if method not in METHODS:
        raise ValueError(f"unknown downsample method {method!r}; valid: {', '.join(METHODS)}")
    if inverse_scale(scale) == 1:  # nothing to do; skip the float round trip
        return np.ascontiguousarray(frame).copy()
    # Contiguous NCHW copy in uint8 (cheap) so the float tensor is NCHW-contiguous too.
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).contiguous()
    xf = x.unsqueeze(0).to(torch.float32).mul_(1.0 / 255.0)
    with torch.inference_mode():
        y = downsample(xf, scale, method)
        y = y.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def centre_crop(frame: np.ndarray, side: int) -> np.ndarray:
    """Centred ``side × side`` crop of an HxW[xC] array (a view, no copy).

    When the margin is odd the extra pixel goes to the bottom/right. Raises `FrameSizeError`
    (a `ValueError`) if the frame is smaller than ``side`` in either direction.
    """
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
        raise ValueError(f"side must be a positive integer, got {side!r}")
    if frame.ndim < 2:
        raise FrameSizeError(f"expected an HxW or HxWxC frame, got shape {frame.shape}")
    h, w = frame.shape[:2]
    if h < side or w < side:
        raise FrameSizeError(f"cannot crop a {side}x{side} square from a {w}x{h} frame (WxH)")
    top, left = (h - side) // 2, (w - side) // 2
    return frame[top : top + side, left : left + side]


def crop_side_for(model_size: int, h: int, w: int) -> tuple[int, int]:
    """Largest square ``side = model_size * k`` (k ≥ 1) that fits in an h×w frame → (side, k).

    Cropping to ``side`` and downsampling with ``scale = 1/k`` gives exactly the model's input
    size. Raises `FrameSizeError` (a `ValueError`) if the frame is smaller than the model.
    """
    for name, v in (("model_size", model_size), ("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    short = min(h, w)
    if short < model_size:
        raise FrameSizeError(
            f"frame {w}x{h} (WxH) is smaller than the model input {model_size}x{model_size}; "
            "use a larger capture size or a model with a smaller input"
        )
    k = short // model_size
    return model_size * k, k
