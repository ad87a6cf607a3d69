"""Integer convolutions whose results are the same on every CPU, thread count and BLAS.

A P-frame's entropy parameters (which probability table codes each latent) and the decoder's
next reference are computed at both ends of a call. Floating-point convolutions differ in the
last bits between machines, thread counts and kernels (summation order, FMA, vector width), and
a range decoder that picks one different table reads garbage from then on. So the networks in
that loop compute on integers (Ballé et al., "Integer networks for data compression", ICLR
2019), in a form that any float32 matrix product gets exactly right:

* activations are integers in [-ACT_MAX, ACT_MAX] (an implied scale of 2^-frac per layer);
* weights are integers in [-WEIGHT_MAX, WEIGHT_MAX] (a per-layer power-of-two scale);
* a 3 x 3 convolution is nine float32 matrix products on shifted views of the input (no
  Winograd, no FFT: plain sums of products). Every product and every partial sum is an
  integer of magnitude at most ACT_MAX * WEIGHT_MAX * fan_in + |bias| < 2^24, and float32
  holds every such integer exactly, so the sum is exact in whatever order, blocking or vector
  width the BLAS uses;
* rescaling to the next layer's scale is integer arithmetic: round half up by an arithmetic
  shift of the int32 sum, then a clamp.

`IntConv2d` trains in float with fake quantization (the straight-through estimator: the
forward pass sees the rounded weights and activations, the gradient passes as if it did not),
and `exact` runs the integer path that a call uses. The two agree except where a value lands
exactly on a rounding boundary in one and not in the other (tested: rare, and bounded by one
step of the output's scale).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACT_MAX = 255  # activations: integers in [-255, 255] (8 bits and a sign)
WEIGHT_MAX = 63  # weights: 7 bits and a sign
EXACT_LIMIT = 1 << 24  # every integer below this is exact in float32
MAX_WEIGHT_FRAC = 12  # finer weights would leave the bias little range (BIAS_MAX / 2^(frac + frac_in))
BIAS_MAX = 1 << 22  # biases at the sum's scale; the rest of the 2^24 is the products'


class RoundSTE(torch.autograd.Function):
    """round-half-up in the forward pass, identity in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.floor(x + 0.5)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g


def round_ste(x: Tensor) -> Tensor:
    return RoundSTE.apply(x)


def quantize_activation(x: Tensor, frac: int, lo: int = -ACT_MAX, hi: int = ACT_MAX) -> Tensor:
    """Float activations -> integers at scale 2^-frac, clamped to [lo, hi] (training: STE)."""
    return torch.clamp(round_ste(x * (1 << frac)), lo, hi)


class IntConv2d(nn.Module):
    """A k x k convolution (replicate padding) from integers at scale 2^-frac_in to integers
    at scale 2^-frac_out in [lo, hi]; `relu`: lo = 0."""

    def __init__(self, cin: int, cout: int, k: int, frac_in: int, frac_out: int, relu: bool) -> None:
        super().__init__()
        if cin * k * k * ACT_MAX * WEIGHT_MAX + BIAS_MAX >= EXACT_LIMIT:
            raise ValueError(f"fan-in {cin * k * k} too wide for exact float32 sums")
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode="replicate")
        self.k, self.frac_in, self.frac_out = k, frac_in, frac_out
        self.lo, self.hi = (0 if relu else -ACT_MAX), ACT_MAX

    def weight_frac(self) -> int:
        """The weights' scale 2^-frac: the largest that keeps every weight within WEIGHT_MAX."""
        peak = float(self.conv.weight.detach().abs().max())
        return min(MAX_WEIGHT_FRAC, int(math.floor(math.log2(WEIGHT_MAX / peak)))) if peak > 0 else MAX_WEIGHT_FRAC

    def integer_weights(self) -> tuple[Tensor, Tensor, int]:
        """(weights, bias, weight frac) as integer-valued float32, the bias at the sum's scale."""
        wf = self.weight_frac()
        w = torch.clamp(torch.floor(self.conv.weight.detach().float() * (1 << wf) + 0.5), -WEIGHT_MAX, WEIGHT_MAX)
        b = torch.floor(self.conv.bias.detach().float() * 2.0 ** (wf + self.frac_in) + 0.5)
        return w, b.clamp(-BIAS_MAX, BIAS_MAX), wf

    def _cached_weights(self) -> tuple[Tensor, Tensor, int]:
        """`integer_weights`, computed again only when the float weights changed (a frame runs
        every layer once or twice: their integers are the same from frame to frame)."""
        version = (self.conv.weight._version, self.conv.bias._version, self.conv.weight.data_ptr())
        if getattr(self, "_cache_version", None) != version:
            self._cache = self.integer_weights()
            self._cache_version = version
        return self._cache

    def forward(self, x: Tensor) -> Tensor:
        """Training: integers in (as floats), integers out, with fake-quantized weights."""
        wf = self.weight_frac()
        w = torch.clamp(round_ste(self.conv.weight * (1 << wf)), -WEIGHT_MAX, WEIGHT_MAX)
        b = torch.clamp(round_ste(self.conv.bias * 2.0 ** (wf + self.frac_in)), -BIAS_MAX, BIAS_MAX)
        p = self.k // 2
        acc = F.conv2d(F.pad(x, (p, p, p, p), mode="replicate") if p else x, w, b)
        return torch.clamp(round_ste(acc * 2.0 ** (self.frac_out - wf - self.frac_in)), self.lo, self.hi)

    @torch.no_grad()
    def exact(self, x: Tensor, weights: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
        """The integer path: (N, cin, H, W) integer-valued float32 -> (N, cout, H, W), the
        same on every machine (see the module's docstring)."""
        w, b, wf = self._cached_weights() if weights is None else weights
        n, cin, h, wd = x.shape
        k, p = self.k, self.k // 2
        if k == 1:
            acc = torch.matmul(w.reshape(w.shape[0], -1), x.reshape(n, cin, -1)) + b[:, None]
            wp = wd
        else:
            # k*k matrix products on shifted views of the padded frame, flattened: tap (dy, dx)
            # reads the flat array from dy * wp + dx on, so no im2col copy is made (measured
            # 1.5-2x faster than unfold at 28 x 28). Each output row gets 2p junk columns (the
            # taps wrap into the next row), cut off at the end. Exact: every partial sum is
            # still an integer below 2^24, in whatever order the products are added.
            wp = wd + 2 * p
            flat = F.pad(F.pad(x, (p, p, p, p), mode="replicate").reshape(n, cin, -1), (0, 2 * p))
            length = h * wp
            taps = w.permute(2, 3, 0, 1)  # (k, k, cout, cin)
            acc = torch.baddbmm(b[None, :, None].expand(n, -1, length), taps[0, 0].expand(n, -1, -1),
                                flat[:, :, :length])
            for t in range(1, k * k):
                dy, dx = divmod(t, k)
                acc.baddbmm_(taps[dy, dx].expand(n, -1, -1), flat[:, :, dy * wp + dx:dy * wp + dx + length])
        # rescale in int32 (exact for these integers; float32 + 1/2 near 2^24 would need a 25th
        # bit): round half up is (a + 2^(s-1)) >> s, an arithmetic shift
        shift = wf + self.frac_in - self.frac_out
        a = acc.to(torch.int32)
        if shift > 0:
            a = (a + (1 << (shift - 1))) >> shift
        elif shift < 0:  # (beyond +-256 the clamp below decides alone: no overflow)
            a = a.clamp_(-ACT_MAX - 1, ACT_MAX + 1) << -shift
        out = a.clamp_(self.lo, self.hi).float().reshape(n, -1, h, wp)
        return out[..., :wd].contiguous() if wp != wd else out
