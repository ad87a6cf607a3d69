"""Range coding of integers under discretized Gaussians whose scales come from a fixed table.

The learned P-frame coder (conditional.py) gives every latent a scale index j into `SCALES`;
the integer k that travels is coded with table j: a zero-mean Gaussian of scale SCALES[j]
integrated over [k - 1/2, k + 1/2] for k in [-n_j, n_j], where n_j covers 12 scales (and at
least 2). Only the index travels from the network to the coder, so both ends build the same
CDFs, as CompressAI's `GaussianConditional` does with its scale table.

The tables are integer frequencies (`frequencies`, computed once in float64 and then plain
integers: every symbol gets at least 1), and constriction's `Categorical(perfect=False)` turns
the same integers into the same fixed-point model at both ends. A sender clamps k into its
table's range (`clamp`): a value beyond 12 scales is so rare that clamping it costs nothing
measurable, and the clamped k is what both ends reconstruct from.

Symbols are coded grouped by table (all latents of table 0 in raster order, then table 1, ...):
the receiver knows every latent's index before it decodes (the indices come from the reference
alone), so one call per table replaces one model per symbol.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import PacketError
from .entropy import _constriction

TAIL_SCALES = 12.0  # a table covers this many scales each side of 0
MIN_HALF_WIDTH = 2
TOTAL = 1 << 16  # frequencies of one table sum to about this


def half_widths(scales: np.ndarray) -> np.ndarray:
    return np.maximum(MIN_HALF_WIDTH, np.ceil(np.asarray(scales) * TAIL_SCALES)).astype(np.int64)


def frequencies(scales: np.ndarray, k_max: int) -> list[np.ndarray]:
    """Integer frequencies of k = -n..n for each scale (n = half_widths, at most k_max)."""
    out = []
    for s, n in zip(scales, np.minimum(half_widths(scales), k_max)):
        k = np.arange(-n, n + 1, dtype=np.float64)
        cdf = np.array([0.5 * math.erfc(-(v / (s * math.sqrt(2)))) for v in np.append(k - 0.5, n + 0.5)])
        p = np.diff(cdf)
        out.append(np.maximum(1, np.round(p / p.sum() * TOTAL)).astype(np.int64))
    return out


class GaussianCoder:
    """Codes integer arrays k under per-element table indices (both the same shape)."""

    def __init__(self, freqs: list[np.ndarray]) -> None:
        _constriction()
        self.half = np.array([(len(f) - 1) // 2 for f in freqs], np.int64)
        self.probs = [f.astype(np.float64) / f.sum() for f in freqs]
        with np.errstate(divide="ignore"):
            self.bits = [-np.log2(p) for p in self.probs]  # ideal code lengths, for estimates

    def clamp(self, k: np.ndarray, index: np.ndarray) -> np.ndarray:
        """k limited to the range of each element's table."""
        n = self.half[index]
        return np.clip(k, -n, n)

    def encode(self, k: np.ndarray, index: np.ndarray) -> bytes:
        enc = self.encoder()
        self.encode_into(enc, k, index)
        return self.payload(enc)

    def encoder(self):
        return _constriction().stream.queue.RangeEncoder()

    @staticmethod
    def payload(enc) -> bytes:
        return enc.get_compressed().astype(">u4").tobytes()

    def encode_into(self, enc, k: np.ndarray, index: np.ndarray) -> None:
        """Append k (any shape) under its tables `index` to a range encoder (`encoder()`)."""
        cx = _constriction()
        k = np.asarray(k, np.int64).ravel()
        index = np.asarray(index, np.int64).ravel()
        if (np.abs(k) > self.half[index]).any():
            raise ValueError("a value is outside its table's range (clamp it first)")
        for j in np.unique(index):
            sym = (k[index == j] + self.half[j]).astype(np.int32)
            enc.encode(sym, cx.stream.model.Categorical(self.probs[j], perfect=False))

    def decoder(self, payload: bytes):
        if len(payload) % 4:
            raise PacketError(f"payload of {len(payload)} bytes is not whole 32-bit words")
        return _constriction().stream.queue.RangeDecoder(np.frombuffer(payload, ">u4").astype(np.uint32))

    def decode_from(self, dec, index: np.ndarray) -> np.ndarray:
        """The next values of a range decoder (`decoder(payload)`), one per element of `index`
        (the work is bounded by the indices' size, which the receiver chose); PacketError on a
        payload that does not decode."""
        cx = _constriction()
        flat = np.asarray(index, np.int64).ravel()
        out = np.empty(flat.size, np.int64)
        try:
            for j in np.unique(flat):
                where = flat == j
                out[where] = dec.decode(cx.stream.model.Categorical(self.probs[j], perfect=False),
                                        int(where.sum())) - self.half[j]
        except (ValueError, RuntimeError, AssertionError, OverflowError) as e:
            raise PacketError(f"payload does not decode: {e}") from None
        return out.reshape(np.shape(index))

    def decode(self, payload: bytes, index: np.ndarray) -> np.ndarray:
        """The inverse of `encode`, given the same indices."""
        return self.decode_from(self.decoder(payload), index)

    def estimate_bits(self, k: np.ndarray, index: np.ndarray) -> float:
        k = np.asarray(k, np.int64).ravel()
        index = np.asarray(index, np.int64).ravel()
        return float(sum(self.bits[j][k[index == j] + self.half[j]].sum() for j in np.unique(index)))
