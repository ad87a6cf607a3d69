"""n-bit uniform scalar quantization of latents, in three modes.

- ``bypass``: identity; stage-1 training runs without quantization (the seed's two-stage method).
- ``minmax``: the seed's mode: per frame, per channel min/max mapped onto 0..2^n-1. The range
  travels as side information (float16 pairs), so the quantizer rounds it to float16 *before*
  use: sender and receiver then dequantize with bit-identical numbers.
- ``fixed``: one range per channel, calibrated once on training data and stored with the
  weights; identical for every frame, so no side information travels and codes mean the same
  thing across frames (what entropy models and inter-frame prediction need).

Codes are uint8 (n <= 8). Dequantization maps code q to lo + q * step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

MODES = ("bypass", "minmax", "fixed")


@dataclass
class QuantizerConfig:
    bits: int = 6
    mode: str = "fixed"
    # fixed mode: per-channel range (lists of C floats); empty until calibrated
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)

    def validate(self, channels: int | None = None) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown quantizer mode {self.mode!r}; valid: {', '.join(MODES)}")
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ConfigError(f"quantizer bits must be an integer in 1..8, got {self.bits!r}")
        if len(self.lo) != len(self.hi):
            raise ConfigError("quantizer lo and hi must have the same length")
        if channels is not None and self.lo and len(self.lo) != channels:
            raise ConfigError(f"fixed range has {len(self.lo)} channels, the model has {channels}")
        if any(not (h > l) for l, h in zip(self.lo, self.hi)):
            raise ConfigError("fixed range needs hi > lo in every channel")

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "mode": self.mode, "lo": list(self.lo), "hi": list(self.hi)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizerConfig":
        known = {"bits", "mode", "lo", "hi"}
        if set(d) - known:
            raise ConfigError(f"unknown quantizer field(s) {sorted(set(d) - known)}; valid: {sorted(known)}")
        try:
            q = cls(bits=int(d.get("bits", 6)), mode=str(d.get("mode", "fixed")),
                    lo=[float(v) for v in d.get("lo", [])], hi=[float(v) for v in d.get("hi", [])])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad quantizer config: {e}") from None
        q.validate()
        return q


@dataclass
class Quantized:
    """Codes of one frame (C, H, W) uint8 and the range that maps them back to latents."""

    codes: np.ndarray
    lo: np.ndarray  # (C,) float32
    hi: np.ndarray  # (C,) float32
    bits: int
    mode: str


class Quantizer(torch.nn.Module):
    """Quantizes latents. Differentiable in training via the straight-through estimator."""

    def __init__(self, cfg: QuantizerConfig, channels: int) -> None:
        super().__init__()
        cfg.validate(channels)
        self.cfg = cfg
        self.channels = channels
        if cfg.mode == "fixed" and cfg.lo:
            lo, hi = torch.tensor(cfg.lo), torch.tensor(cfg.hi)
        else:  # uncalibrated fixed range: a wide default until `calibrate` runs
            lo, hi = torch.full((channels,), -8.0), torch.full((channels,), 8.0)
        self.register_buffer("lo", lo.float(), persistent=False)
        self.register_buffer("hi", hi.float(), persistent=False)

    @property
    def levels(self) -> int:
        return (1 << self.cfg.bits) - 1

    @torch.no_grad()
    def calibrate(self, latents: Tensor, coverage: float = 0.9995) -> None:
        """Set the fixed range per channel from sample latents (N, C, H, W): the central
        `coverage` share of values, so rare outliers are clipped instead of wasting levels."""
        flat = latents.transpose(0, 1).reshape(self.channels, -1).float()
        tail = (1.0 - coverage) / 2
        lo = torch.quantile(flat, tail, dim=1) if flat.shape[1] < 16_000_000 else flat.min(1).values
        hi = torch.quantile(flat, 1 - tail, dim=1) if flat.shape[1] < 16_000_000 else flat.max(1).values
        hi = torch.maximum(hi, lo + 1e-3)
        self.lo.copy_(lo.half().float())
        self.hi.copy_(hi.half().float())
        self.cfg.lo = self.lo.tolist()
        self.cfg.hi = self.hi.tolist()

    def range_for(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(lo, hi), each (N, C, 1, 1), in float16-exact values."""
        if self.cfg.mode == "minmax":
            lo = y.amin(dim=(2, 3), keepdim=True).half().float()
            hi = y.amax(dim=(2, 3), keepdim=True).half().float()
            return lo, hi
        return self.lo.view(1, -1, 1, 1), self.hi.view(1, -1, 1, 1)

    def forward(self, y: Tensor) -> Tensor:
        """Quantize and dequantize (training and evaluation); identity in bypass mode."""
        if self.cfg.mode == "bypass":
            return y
        lo, hi = self.range_for(y)
        q, step = self._codes(y, lo, hi)
        yq = lo + q * step
        if not (torch.is_grad_enabled() and y.requires_grad):
            return yq  # exactly what a receiver's `dequantize` computes
        return y + (yq - y).detach()  # straight-through: forward quantized, backward identity

    def _codes(self, y: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        span = hi - lo
        # a flat channel (hi == lo) has span 0: map it to code 0 instead of dividing by zero
        safe = torch.where(span > 0, span, torch.ones_like(span))
        step = torch.where(span > 0, span / self.levels, torch.zeros_like(span))
        q = torch.round((y - lo) / safe * self.levels).clamp_(0, self.levels)
        return q, step

    @torch.no_grad()
    def quantize(self, y: Tensor) -> list[Quantized]:
        """Latents (N, C, H, W) -> one `Quantized` per frame (codes leave the torch world)."""
        if self.cfg.mode == "bypass":
            raise ConfigError("bypass mode has no codes to transmit; use 'fixed' or 'minmax'")
        lo, hi = self.range_for(y)
        q, _ = self._codes(y, lo, hi)
        codes = q.to(torch.uint8).cpu().numpy()
        lo_np = lo.expand(y.shape[0], -1, 1, 1).reshape(y.shape[0], -1).cpu().numpy().astype(np.float32)
        hi_np = hi.expand(y.shape[0], -1, 1, 1).reshape(y.shape[0], -1).cpu().numpy().astype(np.float32)
        return [Quantized(codes[i], lo_np[i], hi_np[i], self.cfg.bits, self.cfg.mode) for i in range(y.shape[0])]


def dequantize(codes: np.ndarray, lo: Sequence[float] | np.ndarray, hi: Sequence[float] | np.ndarray,
               bits: int) -> Tensor:
    """Codes (C, H, W) or (N, C, H, W) uint8 -> latents float32, the inverse of `Quantizer`."""
    levels = (1 << bits) - 1
    lo_t = torch.as_tensor(np.asarray(lo, dtype=np.float32)).view(-1, 1, 1)
    hi_t = torch.as_tensor(np.asarray(hi, dtype=np.float32)).view(-1, 1, 1)
    step = (hi_t - lo_t) / levels  # flat channel: step 0, every code decodes to lo
    return lo_t + torch.from_numpy(np.ascontiguousarray(codes)).float() * step
