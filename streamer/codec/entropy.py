"""Entropy coding of quantized latents: static per-channel probability tables + a range coder.

The tables are symbol counts of training latents (`fit`), one table per quantizer level and
channel, shipped with the weights (safetensors key `entropy.counts`, shape (levels, C, 256)).
Every frame is coded with the same tables, so a packet needs no side information and any slice
decodes on its own. Counts get +1 before normalising, so every code of a channel's alphabet
stays encodable (a latent the training set never produced costs bits, never an error).

The range coder is `constriction`'s (Rust): its `Categorical(perfect=False)` turns the float64
probabilities into fixed-point ones deterministically, so sender and receiver, given the same
weights file, build identical models. The payload is the coder's 32-bit words, big-endian.

Channels are coded one after another (channel-major, like the raw layout). A learned
hyperprior or context model (per-position probabilities) slots in behind the same two calls.
"""

from __future__ import annotations

import numpy as np

from ..errors import PacketError, WeightsError

MAX_SYMBOLS = 256


def _constriction():
    try:
        import constriction
    except ImportError as e:  # a dependency of the package: only a broken install lacks it
        raise WeightsError("entropy-coded weights need the 'constriction' package "
                           "(pip install constriction)") from e
    return constriction


def fit(codes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Counts (C, 256) int64 of codes (N, C, H, W) uint8; symbols at or above a channel's
    alphabet size (`sizes`, (C,)) are impossible and stay 0."""
    c = codes.shape[1]
    counts = np.zeros((c, MAX_SYMBOLS), np.int64)
    per_channel = np.ascontiguousarray(np.moveaxis(codes, 1, 0)).reshape(c, -1)
    for ch in range(c):
        counts[ch] = np.bincount(per_channel[ch], minlength=MAX_SYMBOLS)[:MAX_SYMBOLS]
        counts[ch, int(sizes[ch]):] = 0
    return counts


class EntropyCoder:
    """Range coding of (C, rows, W) uint8 codes with one static table per (level, channel)."""

    def __init__(self, counts: np.ndarray, sizes: list[np.ndarray]) -> None:
        """counts: (levels, C, 256) symbol counts; sizes[level]: (C,) alphabet sizes."""
        counts = np.asarray(counts)
        if counts.ndim != 3 or counts.shape[2] != MAX_SYMBOLS or len(sizes) != counts.shape[0]:
            raise WeightsError(f"entropy tables of shape {counts.shape}; expected (levels={len(sizes)}, "
                               f"channels, {MAX_SYMBOLS})")
        if (counts < 0).any():
            raise WeightsError("entropy tables hold negative counts")
        cx = _constriction()
        self.levels, self.channels = counts.shape[:2]
        self.sizes = [np.asarray(s, np.int64) for s in sizes]
        self._models = []
        self.bits = []  # ideal code length of each symbol, for rate estimates
        for lv in range(self.levels):
            models, bits = [], np.zeros((self.channels, MAX_SYMBOLS))
            for ch in range(self.channels):
                n = int(self.sizes[lv][ch])
                p = counts[lv, ch, :n].astype(np.float64) + 1.0
                p /= p.sum()
                models.append(cx.stream.model.Categorical(p, perfect=False))
                bits[ch, :n] = -np.log2(p)
                bits[ch, n:] = np.inf
            self._models.append(models)
            self.bits.append(bits)

    def _check(self, level: int, channels: int) -> None:
        if not 0 <= level < self.levels:
            raise PacketError(f"quantizer level {level} outside the model's 0..{self.levels - 1}")
        if channels != self.channels:
            raise PacketError(f"{channels} channels; the entropy tables have {self.channels}")

    def encode(self, codes: np.ndarray, level: int) -> bytes:
        """(C, rows, W) uint8 codes -> payload bytes (a multiple of 4)."""
        self._check(level, codes.shape[0])
        flat = np.ascontiguousarray(codes).reshape(codes.shape[0], -1)
        if (flat.max(axis=1) >= self.sizes[level]).any():
            raise ValueError("a code is outside its channel's alphabet")
        enc = _constriction().stream.queue.RangeEncoder()
        for ch in range(flat.shape[0]):
            enc.encode(flat[ch].astype(np.int32), self._models[level][ch])
        return enc.get_compressed().astype(">u4").tobytes()

    def decode(self, payload: bytes, shape: tuple[int, int, int], level: int) -> np.ndarray:
        """The inverse of `encode`; PacketError on a payload that cannot be these codes."""
        self._check(level, shape[0])
        if len(payload) % 4:
            raise PacketError(f"entropy-coded payload of {len(payload)} bytes is not whole 32-bit words")
        words = np.frombuffer(payload, ">u4").astype(np.uint32)
        per = shape[1] * shape[2]
        try:
            dec = _constriction().stream.queue.RangeDecoder(words)
            out = np.stack([dec.decode(self._models[level][ch], per) for ch in range(shape[0])])
        except (ValueError, RuntimeError, AssertionError) as e:
            raise PacketError(f"entropy-coded payload does not decode: {e}") from None
        return out.astype(np.uint8).reshape(shape)

    def estimate_bits(self, codes: np.ndarray, level: int) -> float:
        """Ideal code length (bits) of (..., C, H, W) codes under the tables: for rate estimates."""
        c = codes.shape[-3]
        idx = np.moveaxis(codes, -3, 0).reshape(c, -1).astype(np.int64)
        return float(np.take_along_axis(self.bits[level], idx, axis=1).sum())
