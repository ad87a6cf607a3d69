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
  is exactly zero padding), the horizontal pass one ``bmm`` over chunks of 16 kept columns,
  each chunk's input window a strided view of the vertical result (columns outside the frame
  get weight 0 in the first/last chunk). No padded copy of the frame, no im2col; see `_Plan`.
  `downsample_frame` runs the Gaussian straight on the HxWxC bytes of a camera frame
  (pixel-interleaved rows, 0..255 values; see `_FramePlan`): the same vertical bags read as
  *bytes* (fbgemm's rowwise-uint8 ``embedding_bag``: a quarter of the memory traffic of a
  float table and no conversion pass), then a depthwise stride-s convolution on the
  interleaved rows seen channels-last, whose output is already HxWxC.

  Measured, 640×480 → 160×120, one thread, 2 shared cores under load (load average 2.5–3):
  `python -m streamer.bench antialias --json --threads 1`, 4 runs: 0.97–1.24 ms, 19.5–22.8×
  the reference, 4.8–5.1× `nearest` (0.19–0.26 ms; the previous block-convolution design:
  1.39 ms, 5.8× in the same conditions); uint8 frames 1.27–1.61 ms (previously 2.37 ms),
  0.64–0.75× `nearest`'s frame path. In one process, alternating, on a quieter machine:
  0.55–0.73 ms against 0.60–0.86 ms before and `nearest`'s 0.11–0.19 ms; frames 0.91–1.08 ms
  against 1.44–1.60 ms. The vertical bags take ≈ 0.27 ms (a single read of the 3.7 MB frame
  takes ≈ 0.09 ms), the chunked bmm ≈ 0.2 ms. Tried and slower here: strided GEMMs for the
  vertical pass, CSR sparse products, NCHW depthwise and single-channel convolutions,
  transposing so the horizontal pass is a second embedding_bag (the transposes cost more than
  they save), a torch.compile'd version (2 ms), de-interleaving the bytes to planes (0.5 ms
  for that copy alone). conv2d has ≈ 0.1 ms of fixed cost per call here, bmm very little.
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

# Kept outputs per chunk in the horizontal pass: one (B·Ho × K) @ (K × G) product per chunk,
# K = s·(G−1) + k input columns. G = 16 measured fastest with MKL at 640×480 → 1/4, one
# thread (G = 8: 2.3×, 20: 1.3×, 32: 1.4× slower; the former 8-output block convolution
# 1.8× slower, conv2d alone costing ≈ 0.1 ms per call here).
_H_CHUNK_OUTPUTS = 16
# Plans kept per module (one per input geometry); a video call uses one.
_MAX_PLANS = 16


@dataclass(frozen=True)
class _Plan:
    """Operands of both passes for one input geometry (B = N·C images of H × W).

    Vertical pass: ``F.embedding_bag`` over the (B·H, W) table of input rows, one bag per
    kept output row (B·Ho bags), each the ≤ k in-frame rows of its window weighted by their
    taps. Rows outside the frame are simply not in the bag, which is FOMM's zero padding.
    ``margin_before`` / ``margin_after`` empty bags (zero rows) frame the B·Ho real ones.

    Horizontal pass, on the (B·Ho, W) rows of that result: kept columns are cut into
    ``chunks`` of G; chunk c reads the K = s·(G−1) + k input columns starting at s·G·c − k//2
    of every row. Seen as a strided view of the buffer (chunk stride s·G, row stride W, no
    copy), that is a batch of (B·Ho, K) matrices, and one ``bmm`` with the (chunks, K, G)
    weights gives all outputs. The window of the first/last chunk runs past the row into the
    neighbouring row (or the zero margin rows); those columns get weight 0 in that chunk, so
    the zero padding costs nothing.
    """

    ho: int
    wo: int
    indices: Tensor  # (nnz,) int32 (int64 for huge tables) rows of the (B·H, W) table
    offsets: Tensor  # (margin_before + B·Ho + margin_after,) start of each bag in `indices`
    weights: Tensor  # (nnz,) taps
    margin_before: int  # empty bags before the real ones (≥ k//2 zero values before row 0)
    chunk_outputs: int  # G
    chunks: int
    window: int  # K
    chunk_weight: Tensor  # (chunks, K, G)


@dataclass(frozen=True)
class _FramePlan:
    """Operands for one HxWxC uint8 camera frame (`downsample_frame`), float32 on the CPU.

    Vertical pass: the same bags as `_Plan`, over the frame's H rows of W·C bytes (a row of
    pixel-interleaved values is just a longer row), read as bytes by fbgemm's rowwise-uint8
    ``embedding_bag`` (see `_byte_rows_vertical`). Horizontal pass: a depthwise convolution
    (one (1, k) Gaussian per channel, stride s, zero padding k//2) on the (Ho, Wo·C) result
    seen channels-last as (Ho, C, 1, W): that view *is* the interleaved rows, and the output,
    channels-last (Ho, C, 1, Wo), is already Ho×Wo×C.
    """

    ho: int
    indices: Tensor
    offsets: Tensor
    weights: Tensor  # float32 taps of the bags
    dw_weight: Tensor  # (C, 1, 1, k) float32


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


def _horizontal_chunks(w: int, s: int, taps64: Tensor) -> tuple[int, int, int, Tensor, int]:
    """(G, chunks, K, weight (chunks, K, G) float64, zero values needed after the last row).

    Output j = G·c + g of chunk c reads columns s·j − ka … s·j + ka, i.e. window positions
    t = s·g … s·g + 2·ka of the chunk's window (which starts at column s·G·c − ka). Weights
    of columns outside 0 … w−1, and of outputs past the last one, are zero.
    """
    k = taps64.numel()
    ka = k // 2
    wo = (w - 1) // s + 1
    g_ = min(_H_CHUNK_OUTPUTS, wo)
    chunks = -(-wo // g_)
    window = s * (g_ - 1) + k
    c = torch.arange(chunks).view(-1, 1, 1)
    t = torch.arange(window).view(1, -1, 1)
    g = torch.arange(g_).view(1, 1, -1)
    u = t - s * g  # tap index
    col = s * g_ * c - ka + t
    valid = (u >= 0) & (u < k) & (col >= 0) & (col < w) & (g_ * c + g < wo)
    weight = torch.where(valid, taps64[u.clamp(0, k - 1)], torch.zeros((), dtype=torch.float64))
    # The last chunk's window ends s·(G·chunks − 1) + ka columns into the last row.
    after = s * (g_ * chunks - 1) + ka + 1 - w
    return g_, chunks, window, weight, max(after, 0)


class AntiAliasDownsample(nn.Module):
    """FOMM's Gaussian anti-alias downsample, computing only the pixels that are kept.

    Same output as `fomm_reference` (to float32 rounding: ≤ 1e-6 on inputs in [0, 1]) for any
    ``scale = 1/s`` with integer s ≥ 1, including the zero-padded borders and sizes that s does
    not divide (output ``ceil(H/s) × ceil(W/s)``). Input: floating tensor (N, C, H, W) with
    C == ``channels``. ``scale == 1`` returns the input itself, as FOMM does.

    Without autograd the two 1-D passes are two single library calls on the input's own
    memory (see `_Plan`): a weighted ``embedding_bag`` over input rows (the vertical pass:
    each kept output row is the weighted sum of the ≤ k input rows of its window, read once
    from a cache-resident window) and one ``bmm`` over strided chunk windows of its result
    (the horizontal pass, at a quarter of the data for s = 4). No padded copy of the frame,
    no im2col. When the input requires grad, two strided depthwise
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
        self._frame_plans: dict[tuple[int, int, int], _FramePlan] = {}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale:g}, kernel_size={self.kernel_size}"

    def _plan(self, b: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> _Plan:
        """Plan for b planar images of h × w pixels (built once per geometry, then reused)."""
        key = (b, h, w, dtype, device)
        plan = self._plans.get(key)
        if plan is None:
            taps = self.taps64.cpu()
            indices, offsets, weights = _vertical_bags(b, h, self.s, taps, device, dtype)
            g, chunks, window, weight, after = _horizontal_chunks(w, self.s, taps)
            # Empty bags around the real ones give the strided windows zeros to read.
            before = -(-self.ka // w)
            n_after = -(-after // w)
            nnz = indices.numel()
            offsets = torch.cat([
                offsets.new_zeros(before), offsets, offsets.new_full((n_after,), nnz)
            ])
            plan = _Plan(
                ho=(h - 1) // self.s + 1,
                wo=(w - 1) // self.s + 1,
                indices=indices,
                offsets=offsets,
                weights=weights,
                margin_before=before,
                chunk_outputs=g,
                chunks=chunks,
                window=window,
                chunk_weight=weight.to(dtype=dtype, device=device),
            )
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _frame_plan(self, h: int, w: int, c: int) -> _FramePlan:
        """Plan for one HxWxC camera frame (float32 on the CPU); see `_FramePlan`."""
        key = (h, w, c)
        plan = self._frame_plans.get(key)
        if plan is None:
            taps = self.taps64.cpu()
            cpu = torch.device("cpu")
            indices, offsets, weights = _vertical_bags(1, h, self.s, taps, cpu, torch.float32)
            k = taps.numel()
            plan = _FramePlan(
                ho=(h - 1) // self.s + 1,
                indices=indices,
                offsets=offsets,
                weights=weights,
                dw_weight=taps.to(torch.float32).view(1, 1, 1, k).repeat(c, 1, 1, 1),
            )
            if len(self._frame_plans) >= _MAX_PLANS:
                self._frame_plans.clear()
            self._frame_plans[key] = plan
        return plan

    def _run(self, table: Tensor, plan: _Plan, rows: int) -> Tensor:
        """Both passes: (B·H, W) contiguous rows → (B·Ho, Wo), ``rows`` = B·Ho."""
        w = table.shape[1]
        # Vertical: one weighted bag of input rows per kept output row (plus the margins).
        y = F.embedding_bag(
            plan.indices, table, plan.offsets, mode="sum", per_sample_weights=plan.weights
        )
        # Horizontal: every chunk's (rows, K) window of y is a strided view; one bmm.
        g, chunks = plan.chunk_outputs, plan.chunks
        windows = y.as_strided(
            (chunks, rows, plan.window),
            (self.s * g, w, 1),
            y.storage_offset() + plan.margin_before * w - self.ka,
        )
        z = torch.bmm(windows, plan.chunk_weight)  # (chunks, rows, G)
        z = z.permute(1, 0, 2).reshape(rows, chunks * g)
        return z if chunks * g == plan.wo else z[:, : plan.wo].contiguous()

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
        return self._run(x.reshape(b * H, W), plan, b * plan.ho).reshape(N, C, plan.ho, plan.wo)

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
    ``gaussian`` skips that round trip: the vertical pass reads the frame's HxWxC bytes as
    they lie, as bytes (no float copy, no channel-planar copy, no scaling pass: the filter is
    linear and its taps sum to 1, so it runs on 0..255 values directly), and both passes work
    on pixel-interleaved rows, so the result is HxWxC with no transposes either way; it
    equals the float path to ±1 (float rounding at .5 ties). See `_FramePlan`.
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


# Per-row (scale, bias) = (1.0, 0.0) as float32 bytes: the trailer fbgemm's rowwise-uint8
# embedding tables carry, so a row's bytes are read as their own values 0..255.
_UNIT_ROW_QPARAMS = torch.tensor([1.0, 0.0], dtype=torch.float32).view(torch.uint8)
# Whether torch has fbgemm's byte embedding_bag (x86 builds do); None until first tried.
_BYTE_BAG_OK: bool | None = None


def _byte_rows_vertical(rows: Tensor, plan: _FramePlan) -> Tensor:
    """Vertical pass on (H, D) uint8 rows → (Ho, D) float32, the bags' weighted row sums.

    The rows are copied once, as bytes, into a table with the 8-byte (scale 1, bias 0)
    trailer per row that ``quantized.embedding_bag_byte_rowwise_offsets`` expects; it reads
    a quarter of the bytes a float32 table would and needs no conversion pass. Without that
    op the rows are converted to float32 and summed by ``F.embedding_bag`` (same result).
    """
    global _BYTE_BAG_OK
    if _BYTE_BAG_OK is not False:
        n, d = rows.shape
        table = torch.empty(n, d + 8, dtype=torch.uint8)
        table[:, :d].copy_(rows)
        table[:, d:].copy_(_UNIT_ROW_QPARAMS.expand(n, 8))
        try:
            y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                table, plan.indices, plan.offsets, False, 0, False, plan.weights, None, False
            )
            _BYTE_BAG_OK = True
            return y
        except (AttributeError, NotImplementedError, RuntimeError):
            if _BYTE_BAG_OK:  # worked before: a real error, not a missing op
                raise
            _BYTE_BAG_OK = False
    return F.embedding_bag(
        plan.indices, rows.to(torch.float32), plan.offsets, mode="sum",
        per_sample_weights=plan.weights,
    )


def _gaussian_frame(frame: np.ndarray, s: int) -> np.ndarray:
    """FOMM Gaussian of an HxWxC uint8 frame (s ≥ 2) on its own interleaved layout."""
    h, w, c = frame.shape
    mod = _gaussian_module(c, s)
    with torch.inference_mode():
        plan = mod._frame_plan(h, w, c)
        rows = torch.from_numpy(np.ascontiguousarray(frame)).view(h, w * c)
        y = _byte_rows_vertical(rows, plan)  # (Ho, W·C) float32 on 0..255
        # Horizontal: (Ho, W·C) seen channels-last as (Ho, C, 1, W), depthwise along W.
        yc = y.view(plan.ho, w, c).permute(0, 2, 1).unsqueeze(2)
        z = F.conv2d(yc, plan.dw_weight, stride=(1, s), padding=(0, mod.ka), groups=c)
        out = z.round_().clamp_(0.0, 255.0).to(torch.uint8)  # (Ho, C, 1, Wo)
        out = out.permute(0, 2, 3, 1)  # (Ho, 1, Wo, C): contiguous when channels-last
    return np.ascontiguousarray(out.numpy()).reshape(plan.ho, -1, c)


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
