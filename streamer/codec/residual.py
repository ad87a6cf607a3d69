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
DIRECT = 7  # residuals in -7..7 are coded directly; larger ones escape to their channel's tail table

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
    """Range coding of (C, rows, W) residuals with the inter tables of one model.

    Each row is coded in two passes: every residual as one symbol of a narrow table (-DIRECT..
    DIRECT, and an escape for anything larger), then the escaped ones, in the same order, with
    their channel's tail table (the residuals beyond DIRECT, whatever the context). Almost every
    residual is small, and a range coder's cost per symbol grows with its table's width: one
    table over a channel's whole range (up to 2 x 255 + 1 symbols) made decoding 5x slower
    (measured: 250 against 48 us per row of 672 residuals). Both tables come from the same
    counts (the escape holds the tail's count), so the weights do not change."""

    def __init__(self, counts: np.ndarray, sizes: list[np.ndarray]) -> None:
        """counts: (levels, C, CONTEXTS, RESIDUAL_SYMBOLS); sizes: per level, (C,) codes per channel."""
        counts = checked_counts(counts, len(sizes), CONTEXTS, RESIDUAL_SYMBOLS, "residual")
        _constriction()
        self.levels, self.channels = counts.shape[:2]
        self.sizes = [np.asarray(s, np.int64) for s in sizes]
        self.half, self.direct = [], []  # per level: the widest residual, the widest coded directly
        self.main, self.tail = [], []  # per level: (C, CONTEXTS, 2 * direct + 2), (C, 2 * half + 1)
        self.bits, self.min_bits = [], []
        for lv in range(self.levels):
            half = int(self.sizes[lv].max()) - 1
            direct = min(DIRECT, half)
            window = slice(OFFSET - half, OFFSET + half + 1)
            inside = _inside(self.sizes[lv])[:, None, window]
            p = np.where(inside, counts[lv, :, :, window] + 1.0, 0.0)  # (C, CONTEXTS, 2 * half + 1)
            near = slice(half - direct, half + direct + 1)
            outside = np.ones(2 * half + 1, bool)
            outside[near] = False
            main = np.concatenate([p[:, :, near], p[:, :, outside].sum(axis=2, keepdims=True)], axis=2)
            main /= main.sum(axis=2, keepdims=True)
            tail = np.where(outside, p.sum(axis=1), 0.0)  # (C, 2 * half + 1): zero where direct
            tail /= np.maximum(tail.sum(axis=1, keepdims=True), 1e-300)
            with np.errstate(divide="ignore"):
                bits = np.empty_like(p)  # ideal code length of every residual, for estimates
                bits[:, :, near] = -np.log2(main[:, :, :-1])
                bits[:, :, outside] = (-np.log2(main[:, :, -1:]) - np.log2(tail[:, None, outside]))
            self.half.append(half)
            self.direct.append(direct)
            self.main.append(main)
            self.tail.append(tail)
            self.bits.append(bits)
            self.min_bits.append((-np.log2(main.max(axis=2))).min(axis=1))

    def _check(self, level: int, channels: int) -> None:
        if not 0 <= level < self.levels:
            raise PacketError(f"quantizer level {level} outside the model's 0..{self.levels - 1}")
        if channels != self.channels:
            raise PacketError(f"{channels} channels; the residual tables have {self.channels}")

    def max_codes(self, payload_bytes: int, level: int, channels: int) -> int:
        """The most residuals a payload of `payload_bytes` can hold (see entropy.EntropyCoder):
        every residual is at least one symbol of its main table."""
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
        main, tail, half, direct = self.main[level], self.tail[level], self.half[level], self.direct[level]
        model = cx.stream.model.Categorical(perfect=False)
        enc = cx.stream.queue.RangeEncoder()
        value = res.astype(np.int32)
        escaped = np.abs(value) > direct
        sym = np.where(escaped, 2 * direct + 1, value + direct)
        for r in range(res.shape[1]):
            enc.encode(sym[:, r].ravel(), model, main[chan, ctx[:, r]].reshape(-1, main.shape[2]))
            c, w = np.nonzero(escaped[:, r])  # (channel, column) order, as the row above
            if c.size:
                enc.encode(value[c, r, w] + half, model, tail[c])
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
        main, tail, half, direct = self.main[level], self.tail[level], self.half[level], self.direct[level]
        n = main.shape[2]
        flat = main.reshape(-1, n)
        base = (np.arange(channels) * CONTEXTS)[:, None]
        top = (self.sizes[level] - 1)[:, None]
        step = max(1, DECODE_CHUNK_FLOATS // n)
        model = cx.stream.model.Categorical(perfect=False)
        try:
            dec = cx.stream.queue.RangeDecoder(np.frombuffer(payload, ">u4").astype(np.uint32))
            idx = np.repeat(base + FIRST_ROW, width, axis=1).reshape(-1)
            row = np.empty(channels * width, np.int64)
            for r in range(rows):
                for s in range(0, idx.size, step):
                    row[s:s + step] = dec.decode(model, flat[idx[s:s + step]])
                value = row.reshape(channels, width) - direct
                c, w = np.nonzero(value > direct)  # escapes: their tails follow, in this order
                if c.size:
                    value[c, w] = dec.decode(model, tail[c]) - half
                if (np.abs(value) > top).any():
                    raise PacketError("residual payload decodes outside the channels' ranges")
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
