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
prediction, never by more than floor(threshold + 1/2) codes (one below a threshold of 1.5), and
its latent error stays under `threshold` steps (rounding's is 1/2); thresholds at or below 1/2
change nothing.

Measured on val (first 60 frames of each clip, the call's framing), with the shipped tables:
- P-frame chains at fixed levels 1-8 (6 clips): at level 3, 0.8 sends 280 kbps at 37.06 dB where
  the nearest codes send 489 kbps at 37.67 dB; over levels 1-8 the BD-rate against off is -30 %
  (0.6), -37 % (0.7), -39 % (0.8), -38 % (0.9), -36 % (1.0), -32 % (1.2). The best threshold
  rises a little with the step (0.7-0.8 at levels 1-3, 0.8-0.9 at 5-8), by at most 3-4 %.
- The call's sessions with their rate control (`evaluate --video --kbps 150,300,500
  --decision-threshold T`, 18 clips): 0.8 gives 174.7 / 318.3 / 501.5 kbps at 33.36 / 35.89 /
  37.29 dB where off gives 207.1 / 337.8 / 521.7 kbps at 31.86 / 35.08 / 36.75 dB: BD-rate
  -25 % (0.7: -22 %); the rate controller spends the saved bits on finer levels.
So one threshold for every level, 0.8 (session.py's `DEFAULT_DECISION_THRESHOLD`).
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
