"""Inter-frame coding of quantized latents: the codes of a P-frame as residuals against the
codes predicted from the reference frame, range-coded with static tables.

A talking head repeats most of its picture from one frame to the next, so most residuals are
0: measured on 8 val clips at the call's framing (60 frames each, level 3, tables fitted on
half of the clips, measured on the other half), residuals cost 0.305 bpp where each frame
coded alone costs 0.83 (today's intra tables); contexts from the reference code's magnitude
would save another 2-3 % but need the reference inside the packet parser, so they are left out
and a P slice decodes without any state.

The prediction is the reference frame's codes, carried to the P-frame's quantizer level by
`Quantizer.requantize` when the level changed. Residual r = code - prediction lies in
[-(n-1), n-1] for a channel of n codes; each (level, channel, context) has a table over those
2n-1 values. The context is the activity above, as for intra codes: floor(log2(1 + the sum of
|r| of the three residuals in the row above)), capped (`ACTIVITY_BUCKETS`), plus one context
for a slice's first row. Tables are symbol counts fitted on consecutive frames of training
video (`fit_levels`) and shipped with the weights (safetensors key `entropy.residual_counts`,
(levels, C, CONTEXTS, RESIDUAL_SYMBOLS)); +1 over the alphabet keeps every residual encodable.

Decoding is bounded as for intra codes (see entropy.py): a payload of n bytes holds at most
about 8n / (the cheapest symbol's bits) residuals, and a claim of more is refused before any
decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import PacketError
from .entropy import DECODE_CHUNK_FLOATS, _constriction, checked_counts, codes_bound

if TYPE_CHECKING:
    from torch import Tensor

    from .quantizer import Quantizer

OFFSET = 255  # residual r is symbol r + OFFSET: -255..255 for channels of up to 256 codes
RESIDUAL_SYMBOLS = 2 * OFFSET + 1
ACTIVITY_BUCKETS = 5
FIRST_ROW = ACTIVITY_BUCKETS  # the context of a slice's first row
CONTEXTS = ACTIVITY_BUCKETS + 1

_BUCKET = np.minimum(ACTIVITY_BUCKETS - 1,
                     np.log2(1 + np.arange(3 * OFFSET + 1, dtype=np.int32)).astype(np.int32))


def contexts(residual: np.ndarray) -> np.ndarray:
    """Context (0..CONTEXTS-1) of every residual in (..., C, rows, W) whose first row starts a slice."""
    a = np.abs(residual.astype(np.int32))
    above = np.zeros_like(a)
    above[..., 1:, :] = a[..., :-1, :]
    activity = above.copy()
    activity[..., :, 1:] += above[..., :, :-1]
    activity[..., :, :-1] += above[..., :, 1:]
    ctx = _BUCKET[np.minimum(activity, 3 * OFFSET)]
    ctx[..., 0, :] = FIRST_ROW
    return ctx


def residuals(codes: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """int16 codes - prediction, both (..., C, H, W) uint8."""
    return codes.astype(np.int16) - prediction.astype(np.int16)


def fit(res: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Counts (C, CONTEXTS, RESIDUAL_SYMBOLS) int64 of whole-frame residuals (N, C, H, W);
    residuals a channel of `sizes[c]` codes cannot have stay 0."""
    c = res.shape[1]
    ctx = contexts(res)
    counts = np.zeros((c, CONTEXTS, RESIDUAL_SYMBOLS), np.int64)
    for ch in range(c):
        idx = ctx[:, ch].ravel() * RESIDUAL_SYMBOLS + res[:, ch].ravel().astype(np.int64) + OFFSET
        counts[ch] = np.bincount(idx, minlength=CONTEXTS * RESIDUAL_SYMBOLS).reshape(CONTEXTS, RESIDUAL_SYMBOLS)
    counts[:, :, :] *= _inside(sizes)[:, None, :]
    return counts


def _inside(sizes: np.ndarray) -> np.ndarray:
    """(C, RESIDUAL_SYMBOLS) bool: the residuals a channel of sizes[c] codes can have."""
    r = np.arange(RESIDUAL_SYMBOLS) - OFFSET
    return np.abs(r)[None, :] <= (np.asarray(sizes, np.int64) - 1)[:, None]


def fit_levels(quantizer: "Quantizer", sequences: "list[Tensor]") -> np.ndarray:
    """Tables (levels, C, CONTEXTS, RESIDUAL_SYMBOLS) from latents of consecutive training
    frames, one (T, C, H, W) tensor per clip: each frame's codes against the previous frame's,
    at every level."""
    levels = len(quantizer.cfg.steps)
    tables = []
    for lv in range(levels):
        sizes, _ = quantizer.alphabet(lv)
        res = []
        for y in sequences:
            codes = np.stack([q.codes for q in quantizer.quantize(y, lv)])
            res.append(residuals(codes[1:], codes[:-1]))
        tables.append(fit(np.concatenate(res), sizes))
    return np.stack(tables)


class ResidualCoder:
    """Range coding of (C, rows, W) residuals with the inter tables of one model."""

    def __init__(self, counts: np.ndarray, sizes: list[np.ndarray]) -> None:
        """counts: (levels, C, CONTEXTS, RESIDUAL_SYMBOLS); sizes: per level, (C,) codes per channel."""
        counts = checked_counts(counts, len(sizes), CONTEXTS, RESIDUAL_SYMBOLS, "residual")
        _constriction()
        self.levels, self.channels = counts.shape[:2]
        self.sizes = [np.asarray(s, np.int64) for s in sizes]
        self.probs, self.bits, self.min_bits, self.half = [], [], [], []
        for lv in range(self.levels):
            half = int(self.sizes[lv].max()) - 1  # one table width per level: -half..half
            window = slice(OFFSET - half, OFFSET + half + 1)
            inside = _inside(self.sizes[lv])[:, None, window]
            p = np.where(inside, counts[lv, :, :, window] + 1.0, 0.0)
            p /= p.sum(axis=2, keepdims=True)
            self.half.append(half)
            self.probs.append(p)  # (C, CONTEXTS, 2 * half + 1)
            with np.errstate(divide="ignore"):
                self.bits.append(-np.log2(p))
            self.min_bits.append((-np.log2(p.max(axis=2))).min(axis=1))

    def _check(self, level: int, channels: int) -> None:
        if not 0 <= level < self.levels:
            raise PacketError(f"quantizer level {level} outside the model's 0..{self.levels - 1}")
        if channels != self.channels:
            raise PacketError(f"{channels} channels; the residual tables have {self.channels}")

    def max_codes(self, payload_bytes: int, level: int, channels: int) -> int:
        """The most residuals a payload of `payload_bytes` can hold (see entropy.EntropyCoder)."""
        self._check(level, channels)
        return codes_bound(self.min_bits[level], payload_bytes)

    def encode(self, res: np.ndarray, level: int) -> bytes:
        """(C, rows, W) residuals -> payload bytes (a multiple of 4)."""
        self._check(level, res.shape[0])
        top = (self.sizes[level] - 1)[:, None, None]
        if (np.abs(res.astype(np.int64)) > top).any():
            raise ValueError("a residual is outside its channel's range")
        cx = _constriction()
        ctx = contexts(res)
        chan = np.arange(res.shape[0])[:, None]
        width = self.probs[level].shape[2]
        model = cx.stream.model.Categorical(perfect=False)
        enc = cx.stream.queue.RangeEncoder()
        sym = res.astype(np.int32) + self.half[level]
        for r in range(res.shape[1]):
            enc.encode(sym[:, r].ravel(), model, self.probs[level][chan, ctx[:, r]].reshape(-1, width))
        return enc.get_compressed().astype(">u4").tobytes()

    def decode(self, payload: bytes, shape: tuple[int, int, int], level: int) -> np.ndarray:
        """The inverse of `encode`: int16 (C, rows, W); PacketError on a payload that cannot be
        these residuals or is too short to hold them (checked before decoding)."""
        self._check(level, shape[0])
        if len(payload) % 4:
            raise PacketError(f"residual payload of {len(payload)} bytes is not whole 32-bit words")
        channels, rows, width = shape
        count = channels * rows * width
        most = self.max_codes(len(payload), level, channels)
        if count > most:
            raise PacketError(f"residual payload of {len(payload)} bytes cannot hold {count} residuals "
                              f"({channels}x{rows}x{width}) at level {level}: at most {most}")
        cx = _constriction()
        out = np.empty(shape, np.int16)
        table = self.probs[level]
        n, half = table.shape[2], self.half[level]
        flat = table.reshape(-1, n)
        base = (np.arange(channels) * CONTEXTS)[:, None]
        top = np.repeat(self.sizes[level] - 1, width)
        step = max(1, DECODE_CHUNK_FLOATS // n)
        model = cx.stream.model.Categorical(perfect=False)
        try:
            dec = cx.stream.queue.RangeDecoder(np.frombuffer(payload, ">u4").astype(np.uint32))
            idx = np.repeat(base + FIRST_ROW, width, axis=1).reshape(-1)
            row = np.empty(channels * width, np.int64)
            for r in range(rows):
                for s in range(0, idx.size, step):
                    row[s:s + step] = dec.decode(model, flat[idx[s:s + step]])
                value = row - half
                if (np.abs(value) > top).any():
                    raise PacketError("residual payload decodes outside the channels' ranges")
                value = value.reshape(channels, width)
                out[:, r] = value
                if r + 1 < rows:
                    a = np.abs(value)
                    activity = a.copy()
                    activity[:, 1:] += a[:, :-1]
                    activity[:, :-1] += a[:, 1:]
                    idx = (base + _BUCKET[np.minimum(activity, 3 * OFFSET)]).reshape(-1)
        except (ValueError, RuntimeError, AssertionError, OverflowError) as e:
            raise PacketError(f"residual payload does not decode: {e}") from None
        return out

    def estimate_bits(self, res: np.ndarray, level: int) -> np.ndarray:
        """Ideal code length (bits) of each row of (C, rows, W) residuals coded as one slice."""
        ctx = contexts(res)
        chan = np.arange(res.shape[0])[:, None, None]
        return self.bits[level][chan, ctx, res.astype(np.int64) + self.half[level]].sum(axis=(0, 2))
