"""Block motion for the learned P-frames: the reference moved before it predicts the next frame.

The learned coder (conditional.py) predicts a frame's latents from the reference's. Where the
picture moves, the latents move too, and the reference predicts them less well. So the sender
picks a shift for each block of BLOCK × BLOCK latent cells (32 × 32 px at 224). A shift is a
quarter-cell translation, 2 px steps up to ±MAX_QUARTERS/4 cells (±8 px). The sender sends the
shifts, and both ends move their integer reference by them before coding against it.

- `choose_shifts` (the sender only, float32, any arithmetic): per block, the shift whose moved
  block is nearest the frame's latents, of all SPAN² (one convolution moves the reference by
  every shift at once).
- `apply_shifts` (both ends): the integer reference moved block by block. It is bilinear in
  sixteenths on integers (int64, rounded half up), so both ends get the same integers on any
  CPU, as the coder's integer networks do.
- `encode_shifts` / `decode_shifts`: the shifts' two components travel first in the P-frame's
  range stream, under one fixed table of the coder's Gaussian set.

Measured with the shipped coder, untrained for it (training/motion_probe.py,
docs/results/learned-p-frames.md): −6.6 % BD-rate on 60-frame val chains, −9.8 % on the clips
that move, −6.2 % on whole clips through the call's sessions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PacketError

BLOCK = 4  # latent cells a side of a block with a shift of its own
MAX_QUARTERS = 4  # the largest shift component, in quarter cells (±1 cell = ±8 px at 224)
SPAN = 2 * MAX_QUARTERS + 1  # values of one component
SHIFT_SCALE_INDEX = 8  # the Gaussian table of the components (scale 0.44): 1.27 bits each on val, the best one


def blocks_of(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """Blocks down and across of latents (…, H, W); the last row and column of blocks are
    smaller where H or W is not a multiple of BLOCK (a --size that is not a multiple of 32)."""
    h, w = shape[-2], shape[-1]
    return -(-h // BLOCK), -(-w // BLOCK)


def apply_shifts(ref: Tensor, shifts: np.ndarray) -> Tensor:
    """ref (1, C, H, W) integers moved block by block; shifts (blocks down, blocks across, 2)
    integer (qy, qx) quarter cells, down and right. Each cell is bilinear in sixteenths of the
    four it falls between, edges replicated, rounded half up: four gathers from the padded
    reference, int64, for all cells at once."""
    by, bx = blocks_of(ref.shape)
    _, c, h, w = ref.shape
    shifts = np.asarray(shifts, np.int64).reshape(by, bx, 2)
    if not shifts.any():
        return ref.clone()
    per_cell = np.repeat(np.repeat(shifts, BLOCK, 0), BLOCK, 1)[:h, :w]  # (H, W, 2)
    iy, fy = np.divmod(-per_cell[..., 0], 4)  # output row y reads row y + iy + fy/4 of the input
    ix, fx = np.divmod(-per_cell[..., 1], 4)
    pad = int(max(np.abs(iy).max(), np.abs(ix).max())) + 1
    p = F.pad(ref.to(torch.float64), (pad, pad, pad, pad), mode="replicate").to(torch.int64)[0]  # (C, H+2p, W+2p)
    rows = np.arange(h)[:, None] + pad + iy
    cols = np.arange(w)[None, :] + pad + ix

    def at(dy: int, dx: int) -> Tensor:
        return p[:, torch.from_numpy(rows + dy), torch.from_numpy(cols + dx)]  # (C, H, W)

    wy0, wy1 = torch.from_numpy(4 - fy), torch.from_numpy(fy)
    wx0, wx1 = torch.from_numpy(4 - fx), torch.from_numpy(fx)
    acc = wy0 * wx0 * at(0, 0) + wy0 * wx1 * at(0, 1) + wy1 * wx0 * at(1, 0) + wy1 * wx1 * at(1, 1)
    return torch.div(acc + 8, 16, rounding_mode="floor").to(ref.dtype)[None]


def shift_exact(ref: Tensor, qy: int, qx: int) -> Tensor:
    """An integer reference (1, C, H, W) with its content moved by (qy, qx) quarter cells (down,
    right) everywhere: `apply_shifts` with one shift for every block."""
    by, bx = blocks_of(ref.shape)
    return apply_shifts(ref, np.broadcast_to(np.array([qy, qx], np.int64), (by, bx, 2)))


def _search_kernels() -> tuple[Tensor, np.ndarray]:
    """The bilinear moves of every shift as 3 x 3 kernels (SPAN², 1, 3, 3), and the shifts."""
    shifts = np.array([(qy, qx) for qy in range(-MAX_QUARTERS, MAX_QUARTERS + 1)
                       for qx in range(-MAX_QUARTERS, MAX_QUARTERS + 1)], np.int64)
    kernels = torch.zeros(len(shifts), 1, 3, 3)
    for n, (qy, qx) in enumerate(shifts):
        iy, fy = divmod(-int(qy), 4)  # as apply_shifts: rows iy and iy + 1, columns ix and ix + 1
        ix, fx = divmod(-int(qx), 4)
        for dy, wy in ((iy, 4 - fy), (iy + 1, fy)):
            for dx, wx in ((ix, 4 - fx), (ix + 1, fx)):
                if wy and wx:
                    kernels[n, 0, dy + 1, dx + 1] += wy * wx / 16
    return kernels, shifts


_KERNELS, _SHIFTS = _search_kernels()
_ZERO = int(np.flatnonzero((_SHIFTS == 0).all(1))[0])


def choose_shifts(ref: Tensor, target: Tensor) -> np.ndarray:
    """The sender's shifts (blocks down, blocks across, 2): per block the one of all SPAN²
    whose moved reference is nearest `target` (the frame's latents at the reference's scale) in
    squared error. One float32 convolution moves the
    reference by every shift at once; a block keeps no shift unless one is better by more than
    rounding's noise."""
    by, bx = blocks_of(ref.shape)
    _, c, h, w = ref.shape
    r, t = ref.to(torch.float32)[0], target.to(torch.float32)[0]
    r = F.pad(r[None], (1, 1, 1, 1), mode="replicate").reshape(c, 1, h + 2, w + 2)
    d = F.conv2d(r, _KERNELS) - t.reshape(c, 1, h, w)  # (C, SPAN², H, W): every move at once
    err = F.pad((d * d).sum(0), (0, bx * BLOCK - w, 0, by * BLOCK - h))  # (SPAN², H, W), whole blocks
    per_block = err.reshape(len(_SHIFTS), by, BLOCK, bx, BLOCK).sum((2, 4))
    best = per_block.argmin(0)
    # moving costs bits: keep a block still unless a shift gains more than 1 % of its error
    still = per_block[_ZERO] <= per_block.min(0).values * 1.01
    best[still] = _ZERO
    return _SHIFTS[best.numpy()]


def encode_shifts(coder, enc, shifts: np.ndarray) -> None:
    """The shifts' components into a range encoder (conditional.gaussian_coder's)."""
    k = np.asarray(shifts, np.int64).ravel()
    coder.encode_into(enc, k, np.full(k.shape, SHIFT_SCALE_INDEX, np.int64))


def decode_shifts(coder, dec, shape: torch.Size | tuple[int, ...]) -> np.ndarray:
    """The shifts of latents of `shape` from a range decoder; PacketError when a component lies
    outside ±MAX_QUARTERS (the table reaches further: only a damaged or crafted payload gets there)."""
    by, bx = blocks_of(shape)
    k = coder.decode_from(dec, np.full(by * bx * 2, SHIFT_SCALE_INDEX, np.int64))
    if np.abs(k).max(initial=0) > MAX_QUARTERS:
        raise PacketError(f"a block shift of {int(np.abs(k).max())} quarter cells (at most {MAX_QUARTERS})")
    return k.reshape(by, bx, 2)


__all__ = ["BLOCK", "MAX_QUARTERS", "blocks_of", "shift_exact", "apply_shifts", "choose_shifts",
           "encode_shifts", "decode_shifts"]
