"""Uniform scalar quantization of latents, in four modes.

- ``bypass``: identity; stage-1 training runs without quantization (the seed's two-stage method).
- ``minmax``: the seed's mode: per frame, per channel min/max mapped onto 0..2^n-1. The range
  travels as side information (float16 pairs), so the quantizer rounds it to float16 *before*
  use: sender and receiver then dequantize with bit-identical numbers.
- ``fixed``: one range per channel, calibrated once on training data and stored with the
  weights; identical for every frame, so no side information travels and codes mean the same
  thing across frames (what entropy models and inter-frame prediction need).
- ``step``: one step size for every channel, from a short list of *levels* (finest first; the
  level travels in each packet, so a rate controller can change it per frame). Integers
  round(y / step) are clipped to the calibrated range's grid, at most 2^bits symbols per channel.
  Meant for entropy coding (`entropy.py`): with one step for all channels the rate goes where the
  signal is, as in JPEG's quantization of an orthogonal transform, instead of 2^bits levels per
  channel however little it varies. Zero is always a level (a residual of 0 costs nothing).

Codes are uint8 (n <= 8). Dequantization maps code q to lo + q * step per channel (fixed,
minmax), or to (q + first) * step (step mode: `first` is the integer of code 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

MODES = ("bypass", "minmax", "fixed", "step")


@dataclass
class QuantizerConfig:
    bits: int = 6
    mode: str = "fixed"
    # fixed mode: per-channel range (lists of C floats); empty until calibrated
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)
    # step mode: the step size of each level (finest first) and the level senders use by default
    steps: list[float] = field(default_factory=list)
    level: int = 0

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
        if self.mode == "step":
            if not self.steps or any(not (isinstance(v, (int, float)) and 0 < v < 1e6) for v in self.steps):
                raise ConfigError(f"step mode needs a list of positive steps, got {self.steps!r}")
            if not (isinstance(self.level, int) and 0 <= self.level < len(self.steps)):
                raise ConfigError(f"quantizer level {self.level!r} outside 0..{len(self.steps) - 1}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bits": self.bits, "mode": self.mode, "lo": list(self.lo), "hi": list(self.hi)}
        if self.mode == "step":  # only then: older configs (and their model ids) stay as they were
            d.update(steps=list(self.steps), level=self.level)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizerConfig":
        known = {"bits", "mode", "lo", "hi", "steps", "level"}
        if set(d) - known:
            raise ConfigError(f"unknown quantizer field(s) {sorted(set(d) - known)}; valid: {sorted(known)}")
        try:
            q = cls(bits=int(d.get("bits", 6)), mode=str(d.get("mode", "fixed")),
                    lo=[float(v) for v in d.get("lo", [])], hi=[float(v) for v in d.get("hi", [])],
                    steps=[float(v) for v in d.get("steps", [])], level=int(d.get("level", 0)))
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
    level: int = 0  # step mode: which step made the codes


class Quantizer(torch.nn.Module):
    """Quantizes latents. Differentiable in training via the straight-through estimator."""

    def __init__(self, cfg: QuantizerConfig, channels: int) -> None:
        super().__init__()
        cfg.validate(channels)
        self.cfg = cfg
        self.channels = channels
        if cfg.mode in ("fixed", "step") and cfg.lo:
            lo, hi = torch.tensor(cfg.lo), torch.tensor(cfg.hi)
        else:  # uncalibrated fixed range: a wide default until `calibrate` runs
            lo, hi = torch.full((channels,), -8.0), torch.full((channels,), 8.0)
        self.register_buffer("lo", lo.float(), persistent=False)
        self.register_buffer("hi", hi.float(), persistent=False)

    @property
    def levels(self) -> int:
        return (1 << self.cfg.bits) - 1

    def check_level(self, level: int | None) -> int:
        """The level to use (None: the configured default); ConfigError if out of range."""
        if level is None:
            return self.cfg.level
        n = len(self.cfg.steps) if self.cfg.mode == "step" else 1
        if not (isinstance(level, int) and 0 <= level < n):
            raise ConfigError(f"quantizer level {level!r} outside 0..{n - 1} (mode {self.cfg.mode})")
        return level

    def grid(self, level: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Step mode: per channel the integer of code 0 and the number of symbols, and the step.

        Computed in float64 from the float16-exact range, so sender and receiver agree exactly.
        A channel whose range needs more than 2^bits steps keeps the central 2^bits of them."""
        step = self.cfg.steps[self.check_level(level)]
        lo = np.floor(self.lo.double().numpy() / step)
        hi = np.ceil(self.hi.double().numpy() / step)
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # zero is always a level
        count = np.minimum(hi - lo + 1, 1 << self.cfg.bits)
        first = np.floor((lo + hi) / 2 - (count - 1) / 2)
        first = np.clip(first, lo, hi - count + 1)
        return first.astype(np.int64), count.astype(np.int64), step

    def alphabet(self, level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per channel (number of codes, the code nearest latent 0) at a level: what entropy
        tables are built on. Fixed mode: 2^bits codes, the middle one."""
        if self.cfg.mode == "step":
            first, count, _ = self.grid(level)
            return count, -first
        n = np.full(self.channels, 1 << self.cfg.bits, np.int64)
        return n, n // 2

    def dequantize_codes(self, codes: Tensor, level: int | None = None, lo: np.ndarray | None = None,
                         hi: np.ndarray | None = None) -> Tensor:
        """Codes (..., C, H, W) as floats -> latents, exactly as `forward` computes them.
        level: step mode's level; lo/hi: a minmax frame's range (other modes use the model's).
        Step mode computes (code + first) * step: integers times the step, so 0 stays exactly 0."""
        if self.cfg.mode == "step":
            first, _, step = self.grid(level)
            return (codes + torch.from_numpy(first).to(codes).view(-1, 1, 1)) * step
        lo_t = self.lo if lo is None else torch.as_tensor(np.asarray(lo, np.float32))
        hi_t = self.hi if hi is None else torch.as_tensor(np.asarray(hi, np.float32))
        return lo_t.view(-1, 1, 1) + codes * ((hi_t - lo_t) / self.levels).view(-1, 1, 1)

    def requantize(self, codes: np.ndarray, from_level: int, to_level: int) -> np.ndarray:
        """Step mode: (C, H, W) codes of one level as the nearest codes of another (the same
        latents on the other grid). Inter-frame prediction across a level change: both ends
        compute it in float64 from integers and the configured steps, so they agree exactly.
        The same level returns the codes unchanged."""
        if from_level == to_level or self.cfg.mode != "step":
            return codes
        f0, _, s0 = self.grid(from_level)
        f1, n1, s1 = self.grid(to_level)
        value = (codes.astype(np.int64) + f0[:, None, None]).astype(np.float64) * (s0 / s1)
        out = np.rint(value).astype(np.int64) - f1[:, None, None]
        return np.clip(out, 0, (n1 - 1)[:, None, None]).astype(np.uint8)

    def neutral_codes(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Codes for 'no information' (a frame with nothing received yet): latent 0 in step
        mode, the middle code otherwise."""
        if self.cfg.mode == "step":
            first, _, _ = self.grid()
            return np.broadcast_to((-first).astype(np.uint8)[:, None, None], shape).copy()
        return np.full(shape, (1 << self.cfg.bits) // 2, np.uint8)

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

    def forward(self, y: Tensor, level: int | None = None) -> Tensor:
        """Quantize and dequantize (training and evaluation); identity in bypass mode."""
        if self.cfg.mode == "bypass":
            return y
        if self.cfg.mode == "step":
            q, _ = self._step_codes(y, level)
            yq = self.dequantize_codes(q, level)  # as `NeuralCodec.latents` does
        else:
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

    def _step_codes(self, y: Tensor, level: int | None) -> tuple[Tensor, float]:
        """Step mode: codes 0..count-1 (as floats) and the step."""
        first, count, step = self.grid(level)
        f = torch.from_numpy(first).to(y.device, y.dtype).view(-1, 1, 1)
        top = torch.from_numpy(count - 1).to(y.device, y.dtype).view(-1, 1, 1)
        q = torch.minimum(torch.round(y / step - f).clamp_(min=0), top)
        return q, step

    @torch.no_grad()
    def quantize(self, y: Tensor, level: int | None = None) -> list[Quantized]:
        """Latents (N, C, H, W) -> one `Quantized` per frame (codes leave the torch world)."""
        if self.cfg.mode == "bypass":
            raise ConfigError("bypass mode has no codes to transmit; use 'fixed', 'step' or 'minmax'")
        if self.cfg.mode == "step":
            level = self.check_level(level)
            q, _ = self._step_codes(y, level)
            codes = q.to(torch.uint8).cpu().numpy()
            lo_np, hi_np = self.lo.numpy(), self.hi.numpy()
            return [Quantized(codes[i], lo_np, hi_np, self.cfg.bits, "step", level) for i in range(y.shape[0])]
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
