"""Anti-aliased downsampling of frames before they reach the encoder.

First Order Motion Model (FOMM) shrinks its input with a Gaussian blur followed by keeping
every s-th pixel ("AntiAliasInterpolation2d"). This module holds:

* `fomm_reference` / `FommReference` — a slow, literal re-implementation of that module
  (k×k depthwise convolution over the *whole* zero-padded frame, then ``[::s, ::s]``). It is the
  ground truth for the tests and the benchmark, not for production use.
* `AntiAliasDownsample` — the same function computed fast. The 2-D Gaussian is separable, so
  it runs as two 1-D passes, each evaluated only at the kept positions (stride s) and each a
  single library call on the data as it lies in memory: the vertical pass is a weighted
  ``F.embedding_bag`` over the frame's rows (every kept output row is the weighted sum of the
  ≤ k input rows of its window; rows outside the frame are simply left out of the bag, which
  is exactly zero padding), the horizontal pass a small dense convolution over blocks of
  s·8 columns seen channels-last (8 kept outputs per block). No padded copy, no im2col, no
  transposes; see `_Plan`. `downsample_frame` runs the same two passes straight on the
  HxWxC bytes of a camera frame (pixel-interleaved rows, 0..255 values).
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

# Outputs per block in the horizontal pass: the block convolution has P output and s·P input
# channels; P = 8 fills one AVX2 register of output channels and measured fastest for the
# whole module (P = 4, 5, 10, 16, 20, 40: 1.25–2.2× slower at 640×480 → 1/4, one thread).
_H_BLOCK_OUTPUTS = 8
# Plans kept per module (one per input geometry); a video call uses one.
_MAX_PLANS = 16


@dataclass(frozen=True)
class _Plan:
    """Operands of both passes for one input geometry (B = N·C images of H × W).

    Vertical pass: ``F.embedding_bag`` over the (B·H, W) table of input rows, one bag per
    kept output row (B·Ho bags), each the ≤ k in-frame rows of its window weighted by their
    taps. Rows outside the frame are simply not in the bag, which is FOMM's zero padding.

    Horizontal pass, on the (B·Ho, W) result: columns are grouped into blocks of L = s·P
    (zero-padded on the right to ``padded_w = blocks·L`` when W needs it); seen
    channels-last, a (B·Ho, L, 1, blocks) tensor *is* that buffer, and a dense
    (P, L, 1, kw) convolution over the block axis (padding kw//2 blocks of zeros) gives the
    P kept outputs of every block, already in output order.
    """

    ho: int
    wo: int
    indices: Tensor  # (nnz,) int32 (int64 for huge tables) rows of the (B·H, W) table
    offsets: Tensor  # (B·Ho,) start of each bag in `indices`
    weights: Tensor  # (nnz,) taps
    outputs_per_block: int  # P
    block: int  # L = s·P input columns per block
    blocks: int
    padded_w: int
    conv_weight: Tensor  # (P, L, 1, kw), channels-last
    conv_pad: int  # kw // 2


def _vertical_bags(
    b: int, h: int, s: int, taps64: Tensor, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, offsets, weights) of the vertical pass for b stacked images of h rows."""
    k = taps64.numel()
    ka = k // 2
    ho = (h - 1) // s + 1
    rows = torch.arange(ho).view(-1, 1) * s - ka + torch.arange(k).view(1, -1)  # (ho, k)
    valid = (rows >= 0) & (rows < h)
    r1 = rows[valid]  # one image's bags, concatenated
    w1 = taps64.view(1, -1).expand(ho, k)[valid]
    counts = valid.sum(dim=1)
    off1 = torch.cumsum(counts, 0) - counts
    img = torch.arange(b).view(-1, 1)
    indices = (r1.view(1, -1) + img * h).reshape(-1)
    offsets = (off1.view(1, -1) + img * r1.numel()).reshape(-1)
    weights = w1.repeat(b)
    # int32 indices are a little faster in fbgemm's kernel (and half the bytes to read).
    itype = torch.int32 if b * h < 2**31 and indices.numel() < 2**31 else torch.int64
    return (
        indices.to(dtype=itype, device=device),
        offsets.to(dtype=itype, device=device),
        weights.to(dtype=dtype, device=device),
    )


def _horizontal_blocks(w: int, s: int, taps64: Tensor) -> tuple[int, int, int, int, Tensor]:
    """(P, L, blocks, padded_w, weight (P, L, 1, kw) float64) of the horizontal pass."""
    k = taps64.numel()
    ka = k // 2
    wo = (w - 1) // s + 1
    p = min(_H_BLOCK_OUTPUTS, wo)
    blk = s * p
    blocks = -(-wo // p)
    # Output a of a block reads block offsets a·s − ka … a·s + ka, i.e. blocks d_lo … d_hi.
    d_lo = (-ka) // blk
    d_hi = ((p - 1) * s + ka) // blk
    half = max(-d_lo, d_hi)
    a = torch.arange(p).view(-1, 1, 1)
    l_ = torch.arange(blk).view(1, -1, 1)
    d = torch.arange(-half, half + 1).view(1, 1, -1)
    t = d * blk + l_ - a * s + ka  # tap index feeding output a from column l of block d
    valid = (t >= 0) & (t < k)
    weight = torch.where(valid, taps64[t.clamp(0, k - 1)], torch.zeros((), dtype=torch.float64))
    return p, blk, blocks, blocks * blk, weight.unsqueeze(2)  # (P, L, 1, kw)


class AntiAliasDownsample(nn.Module):
    """FOMM's Gaussian anti-alias downsample, computing only the pixels that are kept.

    Same output as `fomm_reference` (to float32 rounding: ≤ 1e-6 on inputs in [0, 1]) for any
    ``scale = 1/s`` with integer s ≥ 1, including the zero-padded borders and sizes that s does
    not divide (output ``ceil(H/s) × ceil(W/s)``). Input: floating tensor (N, C, H, W) with
    C == ``channels``. ``scale == 1`` returns the input itself, as FOMM does.

    Without autograd the two 1-D passes are two single library calls on the input's own
    memory (see `_Plan`): a weighted ``embedding_bag`` over input rows (the vertical pass:
    each kept output row is the weighted sum of the ≤ k input rows of its window, read once
    from a cache-resident window) and a small dense block convolution in channels-last
    layout (the horizontal pass, at a quarter of the data for s = 4). No padded copy of the
    frame, no im2col, no transposes. When the input requires grad, two strided depthwise
    convolutions with (k,1) and (1,k) kernels compute the same thing differentiably.
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
        self._plans: dict[tuple[int, int, int, torch.dtype, torch.device], _Plan] = {}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale:g}, kernel_size={self.kernel_size}"

    def _plan(
        self, b: int, h: int, w: int, dtype: torch.dtype, device: torch.device, interleave: int = 1
    ) -> _Plan:
        """Plan for b images of h × w pixels; ``interleave`` = C for HxWxC rows (C values/pixel)."""
        key = (b, h, w, interleave, dtype, device)
        plan = self._plans.get(key)
        if plan is None:
            taps = self.taps64.cpu()
            indices, offsets, weights = _vertical_bags(b, h, self.s, taps, device, dtype)
            p, blk, blocks, padded_w, weight = _horizontal_blocks(w, self.s, taps)
            if interleave > 1:
                # Pixel-interleaved rows: the same filter on every channel, channels kept apart
                # (block-diagonal in the channel index).
                c = interleave
                wide = weight.new_zeros(p * c, blk * c, 1, weight.shape[-1])
                for i in range(c):
                    wide[i::c, i::c] = weight
                weight = wide
            plan = _Plan(
                ho=(h - 1) // self.s + 1,
                wo=((w - 1) // self.s + 1) * interleave,
                indices=indices,
                offsets=offsets,
                weights=weights,
                outputs_per_block=p * interleave,
                block=blk * interleave,
                blocks=blocks,
                padded_w=padded_w * interleave,
                conv_weight=weight.to(dtype=dtype, device=device).contiguous(
                    memory_format=torch.channels_last
                ),
                conv_pad=weight.shape[-1] // 2,
            )
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    @staticmethod
    def _run(table: Tensor, plan: _Plan) -> Tensor:
        """Both passes: (B·H, W') contiguous rows → (B·Ho, Wo') (W' = W·interleave)."""
        rows = plan.offsets.numel()  # B·Ho
        # Vertical: one weighted bag of input rows per kept output row.
        y = F.embedding_bag(
            plan.indices, table, plan.offsets, mode="sum", per_sample_weights=plan.weights
        )
        if plan.padded_w != table.shape[1]:
            y = F.pad(y, (0, plan.padded_w - table.shape[1]))
        # Horizontal: (B·Ho, Wp) seen as channels-last (B·Ho, L, 1, blocks).
        yb = y.view(rows, 1, plan.blocks, plan.block).permute(0, 3, 1, 2)
        z = F.conv2d(yb, plan.conv_weight, padding=(0, plan.conv_pad))  # (B·Ho, P, 1, blocks)
        z = z.permute(0, 2, 3, 1).reshape(rows, plan.blocks * plan.outputs_per_block)
        return z if z.shape[1] == plan.wo else z[:, : plan.wo].contiguous()

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
        b = N * C
        plan = self._plan(b, H, W, x.dtype, x.device)
        return self._run(x.reshape(b * H, W), plan).reshape(N, C, plan.ho, plan.wo)

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


def _gaussian_module(channels: int, s: int) -> AntiAliasDownsample:
    key = (channels, s)
    mod = _GAUSSIAN_CACHE.get(key)
    if mod is None:
        mod = AntiAliasDownsample(channels, 1.0 / s)
        _GAUSSIAN_CACHE[key] = mod
    return mod


def _gaussian(x: Tensor, s: int) -> Tensor:
    return _gaussian_module(x.shape[1], s)(x)


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

    Works on [0, 1] floats internally, then rounds and clips back to 0..255. The default
    ``gaussian`` skips that round trip: the frame's HxWxC bytes become float rows as they lie
    (no channel-planar copy, no scaling pass: the filter is linear and its taps sum to 1, so it
    runs on 0..255 values directly) and both passes work on pixel-interleaved rows, so the
    result is HxWxC with no transposes either way; it equals the float path to ±1 (float
    rounding at .5 ties).
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
    if method == "gaussian":
        return _gaussian_frame(frame, inverse_scale(scale))
    # Contiguous NCHW copy in uint8 (cheap) so the float tensor is NCHW-contiguous too.
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).contiguous()
    xf = x.unsqueeze(0).to(torch.float32).mul_(1.0 / 255.0)
    with torch.inference_mode():
        y = downsample(xf, scale, method)
        y = y.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def _gaussian_frame(frame: np.ndarray, s: int) -> np.ndarray:
    """FOMM Gaussian of an HxWxC uint8 frame (s ≥ 2) on its own interleaved layout."""
    h, w, c = frame.shape
    mod = _gaussian_module(c, s)
    with torch.inference_mode():
        table = torch.from_numpy(np.ascontiguousarray(frame)).view(h, w * c).to(torch.float32)
        plan = mod._plan(1, h, w, torch.float32, table.device, interleave=c)
        z = mod._run(table, plan)  # (Ho, Wo·C) on 0..255
        out = z.round_().clamp_(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(out.numpy()).reshape(plan.ho, plan.wo // c, c)


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
