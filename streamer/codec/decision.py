"""The sender's rate-distortion decision for P-frames: keep the reference's code where the
frame barely changed.

A P-frame codes the residual between each latent code and its prediction (the reference's code,
carried to this frame's level: `Quantizer.requantize`). Between two frames of a talking head
most latents move by a fraction of a step, yet the nearest code of a latent that sits near a
rounding boundary flips back and forth between neighbours: a residual of +-1 that costs several
bits (a 0 costs a fraction of a bit) and buys only the difference between two rounding errors.
So where the latent is within `threshold` steps of the prediction, the encoder sends the
prediction instead (residual 0):

    u = y / step - first             # the unrounded code (codes = clip(round(u)), quantizer.py)
    sent = prediction where |u - prediction| <= threshold, else round(u)

The receiver needs nothing new: a residual of 0 is an ordinary residual, and the sent codes are
what both ends hold as the next reference. The decision only moves a code towards its
prediction, never by more than ceil(threshold - 1/2) (one code for thresholds below 1.5), and
its latent error stays under `threshold` steps (rounding's is 1/2); thresholds at or below 1/2
change nothing. A threshold of 0.8 at level 3 on val clips cost 0.31 bpp instead of 0.415 at
-0.6 dB; the rate controller spends the saved bits on finer levels (measured in session.py's
`DEFAULT_DECISION_THRESHOLD`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .quantizer import Quantizer

__all__ = ["keep_reference", "unrounded_codes"]


def unrounded_codes(quantizer: "Quantizer", latents: np.ndarray, level: int) -> np.ndarray:
    """Step mode: latents (C, H, W) as unrounded codes y / step - first (float64), the values
    `Quantizer.quantize` rounds and clips to the codes of `level`."""
    first, _, step = quantizer.grid(level)
    return np.asarray(latents, np.float64) / step - first[:, None, None]


def keep_reference(codes: np.ndarray, unrounded: np.ndarray, prediction: np.ndarray,
                   threshold: float | None) -> np.ndarray:
    """The codes to send: `prediction` wherever |unrounded - prediction| <= threshold, else
    `codes`. codes, prediction: (C, H, W) uint8; unrounded: the same shape, y / step - first
    (what `codes` are the rounded, clipped values of). threshold None or <= 0: `codes` itself."""
    if threshold is None or threshold <= 0:
        return codes
    if codes.shape != prediction.shape or unrounded.shape != codes.shape:
        raise ValueError(f"shapes differ: codes {codes.shape}, unrounded {unrounded.shape}, "
                         f"prediction {prediction.shape}")
    near = np.abs(unrounded.astype(np.float64) - prediction) <= threshold
    return np.where(near, prediction, codes).astype(np.uint8)
