"""Picture quality measures on 8-bit frames."""

from __future__ import annotations

import math

import numpy as np


def mse(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def psnr_from_mse(m: float, peak: float = 255.0) -> float:
    return float("inf") if m <= 0 else 10.0 * math.log10(peak * peak / m)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 pictures (peak 255)."""
    return psnr_from_mse(mse(a, b))
