"""Entropy coding of quantized latents: static context-conditioned probability tables + a range coder.

Each code is coded with a table chosen by (quantizer level, channel, context). The context is
the *activity above it*: the sum of |value| of the three codes in the row above (same channel,
columns w-1, w, w+1; value = code minus the code of latent 0), bucketed as floor(log2(1 + sum))
capped at 7, plus context 8 for a slice's first row, which has no row above (slices decode on
their own). Busy regions get wide tables, flat ones peaked tables. Measured on val at step 0.1
with the shipped encoder: 0.881 bpp with one table per channel, 0.762 bpp with these contexts.

The tables are symbol counts of training latents (`fit`), shipped with the weights (safetensors
key `entropy.counts`, shape (levels, C, CONTEXTS, 256)). Counts get +1 over a channel's alphabet
before normalising, so every code stays encodable (a latent the training set never produced
costs bits, never an error).

Coding runs row by row (all channels of a row in one call), so the decoder has row r-1 when it
needs row r's contexts. The range coder is `constriction`'s (Rust): `Categorical(perfect=False)`
turns float64 probabilities into fixed-point ones deterministically, so sender and receiver,
given the same weights file, use identical models. The payload is its 32-bit words, big-endian.

Decoding does bounded work per payload byte: every code costs at least the fewest bits any
table of its channel gives a symbol (`min_bits`), so a payload of n bytes holds at most about
8n / min_bits codes; a claim of more is refused before decoding (`max_codes`), as is one over
`MAX_DECODE_CODES`. The decoder builds the probability rows of at most `DECODE_CHUNK_FLOATS`
floats at a time, so its memory is O(the codes it returns), whatever the row width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import PacketError, WeightsError

if TYPE_CHECKING:
    from torch import Tensor

    from .quantizer import Quantizer

MAX_SYMBOLS = 256
ACTIVITY_BUCKETS = 8
FIRST_ROW = ACTIVITY_BUCKETS  # the context of a slice's first row
CONTEXTS = ACTIVITY_BUCKETS + 1
MAX_DECODE_CODES = 1 << 18  # codes one payload may decode to: a 744x744 frame's 24 x 93 x 93 (pack_frame slices to fit)
DECODE_CHUNK_FLOATS = 1 << 15  # probabilities built per decoder call: 256 KiB of float64
# Slack of the bound on codes per payload: the coder's final words (64 bits) and 2 % for the
# fixed-point rounding of probabilities (the ideal length of a code, not its exact cost).
_BOUND_SLACK_BITS = 64
_BOUND_SLACK = 0.98


# floor(log2(1 + activity)) capped, for every activity three codes can have (as `contexts`)
_BUCKET = np.minimum(ACTIVITY_BUCKETS - 1, np.log2(1 + np.arange(3 * 255 + 1, dtype=np.int32)).astype(np.int32))


def codes_bound(min_bits: np.ndarray, payload_bytes: int) -> int:
    """The most symbols a range-coded payload of `payload_bytes` can hold when channel c's
    cheapest symbol costs `min_bits[c]` bits, counted in whole columns (a code of every channel
    at each position, as they are coded), capped at `MAX_DECODE_CODES`."""
    per_column = float(min_bits.sum()) * _BOUND_SLACK
    columns = (8 * payload_bytes + _BOUND_SLACK_BITS) / per_column if per_column > 0 else float("inf")
    return int(min(MAX_DECODE_CODES, columns * len(min_bits)))


def checked_counts(counts: np.ndarray, levels: int, contexts: int, symbols: int, what: str) -> np.ndarray:
    """Tables of counts (levels, channels, contexts, symbols) as an array; WeightsError if their
    shape is another or a count is negative (tables come from a weights file: untrusted)."""
    counts = np.asarray(counts)
    if counts.ndim != 4 or counts.shape[2:] != (contexts, symbols) or counts.shape[0] != levels:
        raise WeightsError(f"{what} tables of shape {counts.shape}; expected (levels={levels}, "
                           f"channels, {contexts}, {symbols})")
    if (counts < 0).any():
        raise WeightsError(f"{what} tables hold negative counts")
    return counts


def _constriction():
    try:
        import constriction
    except ImportError as e:  # a dependency of the package: only a broken install lacks it
        raise WeightsError("entropy-coded weights need the 'constriction' package "
                           "(pip install constriction)") from e
    return constriction


def contexts(codes: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Context (0..CONTEXTS-1) of every code in (..., C, rows, W) codes whose first row starts a
    slice; `zero` (C,) is each channel's code of latent 0."""
    value = np.abs(codes.astype(np.int32) - zero.astype(np.int32)[:, None, None])
    above = np.zeros_like(value)
    above[..., 1:, :] = value[..., :-1, :]
    activity = above.copy()
    activity[..., :, 1:] += above[..., :, :-1]
    activity[..., :, :-1] += above[..., :, 1:]
    ctx = np.minimum(ACTIVITY_BUCKETS - 1, np.log2(1 + activity).astype(np.int32))
    ctx[..., 0, :] = FIRST_ROW
    return ctx


def fit(codes: np.ndarray, sizes: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Counts (C, CONTEXTS, 256) int64 of whole-frame codes (N, C, H, W) uint8; symbols at or
    above a channel's alphabet size (`sizes`, (C,)) are impossible and stay 0."""
    c = codes.shape[1]
    ctx = contexts(codes, zero)
    counts = np.zeros((c, CONTEXTS, MAX_SYMBOLS), np.int64)
    for ch in range(c):
        idx = ctx[:, ch].ravel() * MAX_SYMBOLS + codes[:, ch].ravel()
        counts[ch] = np.bincount(idx, minlength=CONTEXTS * MAX_SYMBOLS).reshape(CONTEXTS, MAX_SYMBOLS)
        counts[ch, :, int(sizes[ch]):] = 0
    return counts


def fit_levels(quantizer: "Quantizer", latents: "Tensor") -> np.ndarray:
    """Tables (levels, C, CONTEXTS, 256) for every level of `quantizer` from training latents
    (N, C, H, W) (whole frames: their first rows teach the first-row context)."""
    levels = len(quantizer.cfg.steps) if quantizer.cfg.mode == "step" else 1
    tables = []
    for lv in range(levels):
        codes = np.stack([q.codes for q in quantizer.quantize(latents, lv)])
        tables.append(fit(codes, *quantizer.alphabet(lv)))
    return np.stack(tables)


class EntropyCoder:
    """Range coding of (C, rows, W) uint8 codes with the tables of one model."""

    def __init__(self, counts: np.ndarray, sizes: list[np.ndarray], zeros: list[np.ndarray]) -> None:
        """counts: (levels, C, CONTEXTS, 256); per level, sizes: (C,) alphabet sizes and
        zeros: (C,) the code of latent 0."""
        if len(zeros) != len(sizes):
            raise WeightsError(f"entropy tables: {len(zeros)} levels of zero codes for {len(sizes)} levels")
        counts = checked_counts(counts, len(sizes), CONTEXTS, MAX_SYMBOLS, "entropy")
        _constriction()
        self.levels, self.channels = counts.shape[:2]
        self.sizes = [np.asarray(s, np.int64) for s in sizes]
        self.zeros = [np.asarray(z, np.int64) for z in zeros]
        self.probs, self.bits = [], []
        self.min_bits: list[np.ndarray] = []  # per level, (C,): the cheapest symbol of each channel, bits
        for lv in range(self.levels):
            n = int(self.sizes[lv].max())  # one width per level: rows of all channels in one call
            inside = np.arange(n)[None, None, :] < self.sizes[lv][:, None, None]
            p = np.where(inside, counts[lv, :, :, :n] + 1.0, 0.0)
            p /= p.sum(axis=2, keepdims=True)
            self.probs.append(p)  # (C, CONTEXTS, n)
            with np.errstate(divide="ignore"):
                self.bits.append(-np.log2(p))  # ideal code lengths, for rate estimates
            self.min_bits.append((-np.log2(p.max(axis=2))).min(axis=1))

    def max_codes(self, payload_bytes: int, level: int, channels: int) -> int:
        """The most codes a range-coded payload of `payload_bytes` can hold at `level` (see
        `codes_bound`): a payload that claims more is not this model's."""
        self._check(level, channels)
        return codes_bound(self.min_bits[level], payload_bytes)

    def _check(self, level: int, channels: int) -> None:
        if not 0 <= level < self.levels:
            raise PacketError(f"quantizer level {level} outside the model's 0..{self.levels - 1}")
        if channels != self.channels:
            raise PacketError(f"{channels} channels; the entropy tables have {self.channels}")

    def encode(self, codes: np.ndarray, level: int) -> bytes:
        """(C, rows, W) uint8 codes -> payload bytes (a multiple of 4)."""
        self._check(level, codes.shape[0])
        if (codes.reshape(codes.shape[0], -1).max(axis=1) >= self.sizes[level]).any():
            raise ValueError("a code is outside its channel's alphabet")
        cx = _constriction()
        ctx = contexts(codes, self.zeros[level])
        chan = np.arange(codes.shape[0])[:, None]
        model = cx.stream.model.Categorical(perfect=False)
        enc = cx.stream.queue.RangeEncoder()
        for r in range(codes.shape[1]):
            enc.encode(codes[:, r].astype(np.int32).ravel(), model,
                       self.probs[level][chan, ctx[:, r]].reshape(-1, self.probs[level].shape[2]))
        return enc.get_compressed().astype(">u4").tobytes()

    def decode(self, payload: bytes, shape: tuple[int, int, int], level: int) -> np.ndarray:
        """The inverse of `encode`; PacketError on a payload that cannot be these codes, or that
        is too short to hold them (see `max_codes`: checked before any decoding)."""
        self._check(level, shape[0])
        if len(payload) % 4:
            raise PacketError(f"entropy-coded payload of {len(payload)} bytes is not whole 32-bit words")
        channels, rows, width = shape
        count = channels * rows * width
        if count > self.max_codes(len(payload), level, channels):
            raise PacketError(f"entropy-coded payload of {len(payload)} bytes cannot hold {count} codes "
                              f"({channels}x{rows}x{width}) at level {level}: at most "
                              f"{self.max_codes(len(payload), level, channels)}")
        cx = _constriction()
        out = np.empty(shape, np.uint8)
        zero = self.zeros[level]
        table = self.probs[level]
        n = table.shape[2]
        flat = table.reshape(-1, n)  # (C * CONTEXTS, n)
        base = (np.arange(channels) * CONTEXTS)[:, None]
        limit = np.repeat(self.sizes[level], width)  # each symbol's alphabet, in row order
        step = max(1, DECODE_CHUNK_FLOATS // n)
        model = cx.stream.model.Categorical(perfect=False)
        try:
            dec = cx.stream.queue.RangeDecoder(np.frombuffer(payload, ">u4").astype(np.uint32))
            idx = np.repeat(base + FIRST_ROW, width, axis=1).reshape(-1)
            row = np.empty(channels * width, np.int64)
            for r in range(rows):  # idx: each symbol's table, in (channel, column) order as encoded
                for s in range(0, idx.size, step):  # the same stream, decoded a chunk at a time
                    row[s:s + step] = dec.decode(model, flat[idx[s:s + step]])
                if (row >= limit).any():
                    raise PacketError("entropy-coded payload decodes to codes outside the alphabet")
                value = row.reshape(channels, width)
                out[:, r] = value
                if r + 1 < rows:  # the next row's contexts come from this one (as `contexts`)
                    value = np.abs(value - zero[:, None])
                    activity = value.copy()
                    activity[:, 1:] += value[:, :-1]
                    activity[:, :-1] += value[:, 1:]
                    idx = (base + _BUCKET[activity]).reshape(-1)
        except (ValueError, RuntimeError, AssertionError, OverflowError) as e:
            raise PacketError(f"entropy-coded payload does not decode: {e}") from None
        return out

    def estimate_bits(self, codes: np.ndarray, level: int) -> np.ndarray:
        """Ideal code length (bits) of each row of (C, rows, W) codes coded as one slice."""
        ctx = contexts(codes, self.zeros[level])
        chan = np.arange(codes.shape[0])[:, None, None]
        return self.bits[level][chan, ctx, codes.astype(np.int64)].sum(axis=(0, 2))
