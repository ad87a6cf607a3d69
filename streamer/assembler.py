"""Slices -> frames on the receiver, with concealment of what was lost.

A frame arrives as one or more slices (bands of latent rows, see codec/bitstream.py). The
`FrameAssembler` collects them and hands out `AssembledFrame`s, strictly in increasing frame
number, when

* all its slices are in (complete), or
* its last slice (the bottom rows; slices leave in row order) arrives, a slice of a newer frame
  arrives, or its deadline passes, with rows still missing: the
  missing latent rows are copied from the previous frame's latents (the last good picture
  stays where the new one has holes) and the frame counts as *concealed*.

Anything for a frame at or before the newest one handed out is late and dropped, so pictures
never go backwards. A sender restart (frame numbers start again, capture clock moves on) is
recognised by a lower frame number with a newer timestamp and resets the ordering.

Bad packets never raise: corrupt or truncated ones count in `bad_packets`, packets of another
model in `foreign`; the call goes on.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .codec import NeuralCodec
from .codec.bitstream import Packet
from .errors import PacketError

# A slice of the next frame normally ends the wait for a frame's lost slices (one channel, no
# reordering: when frame n+1 starts, n's missing slices are gone). The deadline only covers a
# stream that pauses. It must exceed the spread of one frame's slices, which on a loaded
# 2-core machine reaches tens of ms (measured p95 ~150 ms in one process at load 8).
DEFAULT_DEADLINE_S = 0.1


def codes_crc(codes: np.ndarray) -> int:
    """CRC32 of a frame's codes (C, H, W) uint8: the sender sends it per frame (meta channel)
    so the receiver can prove its latents are bit-exact."""
    return zlib.crc32(np.ascontiguousarray(codes, dtype=np.uint8).tobytes())


class AssembledFrame:
    """A frame ready to decode. Its latents are built on first use (`latents()`, in the decoder's
    thread, not the event loop): codes are dequantized with the frame's range, and rows that
    never arrived take the previous frame's latents."""

    def __init__(self, frame_number: int, timestamp_us: int, codes: np.ndarray, have: np.ndarray,
                 lo: np.ndarray | None, hi: np.ndarray | None, prev: "AssembledFrame | None",
                 first_arrival: float, last_arrival: float, level: int = 0) -> None:
        self.frame_number = frame_number
        self.timestamp_us = timestamp_us  # sender's capture time
        self.codes = codes  # (C, H, W) uint8; missing rows hold the previous frame's codes
        self.have = have  # bool per latent row
        self.lo, self.hi = lo, hi  # minmax range (None: the model's fixed range)
        self.level = level  # step mode: the quantizer level of the frame's slices
        self._prev = prev if not have.all() else None
        self._latents: torch.Tensor | None = None
        self.first_arrival, self.last_arrival = first_arrival, last_arrival

    @property
    def rows_received(self) -> int:
        return int(self.have.sum())

    @property
    def rows_total(self) -> int:
        return int(self.have.size)

    @property
    def complete(self) -> bool:
        return bool(self.have.all())

    @property
    def concealed(self) -> bool:
        return not self.complete

    def crc(self) -> int:
        return codes_crc(self.codes)

    def latents(self, codec: NeuralCodec) -> torch.Tensor:
        """(1, C, H, W) float32 for `codec.decode_latents` (cached)."""
        if self._latents is None:
            y = codec.latents(self.codes, self.lo, self.hi, self.level)
            if not self.have.all():
                missing = torch.from_numpy(~self.have)
                prev = self._prev
                if prev is not None and prev.codes.shape == self.codes.shape:
                    y[:, :, missing] = prev.latents(codec)[:, :, missing]
                elif self.lo is not None:  # no previous frame: the fixed range's middle, not this range's
                    y[:, :, missing] = codec.latents(self.codes)[:, :, missing]
            self._latents = y
            self._prev = None  # the chain ends here: older frames can be freed
        return self._latents


@dataclass
class _Pending:
    number: int
    timestamp_us: int
    shape: tuple[int, int, int]
    codes: np.ndarray
    lo: np.ndarray | None
    hi: np.ndarray | None
    have: np.ndarray  # bool per latent row
    first_arrival: float
    last_arrival: float
    level: int = 0
    slices: int = 0
    saw_last: bool = False


@dataclass
class AssemblerCounters:
    packets: int = 0
    bytes: int = 0
    bad_packets: int = 0  # corrupt, truncated, malformed
    foreign: int = 0  # another model / quantizer
    late: int = 0  # for a frame already handed out (or older)
    duplicate: int = 0
    complete: int = 0
    concealed: int = 0
    lost: int = 0  # frame numbers skipped entirely (no slice arrived)
    restarts: int = 0
    last_error: str = field(default="", repr=False)


class FrameAssembler:
    def __init__(self, codec: NeuralCodec, deadline_s: float = DEFAULT_DEADLINE_S,
                 clock: Callable[[], float] = time.monotonic, conceal_on_last: bool = True) -> None:
        self.codec = codec
        self.deadline_s = deadline_s
        self.conceal_on_last = conceal_on_last
        self.clock = clock
        self.n = AssemblerCounters()
        self._pending: dict[int, _Pending] = {}
        self._last_number: int | None = None  # newest frame handed out
        self._last_ts = 0
        self._prev: AssembledFrame | None = None

    # -- input -----------------------------------------------------------------------------
    def add(self, data: bytes) -> list[AssembledFrame]:
        """One data-channel message in; the frames that became ready out (oldest first)."""
        now = self.clock()
        self.n.packets += 1
        self.n.bytes += len(data) if isinstance(data, (bytes, bytearray)) else 0
        try:
            p = self.codec.unpack(data)
        except PacketError as e:
            msg = str(e)
            if "model" in msg or "channels x" in msg or "mode" in msg:
                self.n.foreign += 1
            else:
                self.n.bad_packets += 1
            self.n.last_error = msg
            return []
        except Exception as e:  # noqa: BLE001 - a decoder bug on hostile input must not end the call
            self.n.bad_packets += 1
            self.n.last_error = f"{type(e).__name__}: {e}"
            return []
        return self._add_packet(p, now)

    def _add_packet(self, p: Packet, now: float) -> list[AssembledFrame]:
        h = p.header
        out: list[AssembledFrame] = []
        if self._last_number is not None and h.frame_number <= self._last_number:
            if h.timestamp_us > self._last_ts:
                self._restart()  # the sender started again: numbers restart, the clock went on
            else:
                self.n.late += 1
                return out
        pend = self._pending.get(h.frame_number)
        shape = (h.channels, h.height, h.width)
        if pend is None:
            # a newer frame began: older unfinished frames will not improve (unreliable channel)
            out += self._flush(before=h.frame_number)
            pend = self._new_pending(h.frame_number, h.timestamp_us, shape, now)
            self._pending[h.frame_number] = pend
        elif pend.shape != shape:
            self.n.bad_packets += 1
            self.n.last_error = f"slice shape {shape} differs from its frame's {pend.shape}"
            return out
        rows = slice(h.row_start, h.row_start + h.row_count)
        if pend.have[rows].all():
            self.n.duplicate += 1
            return out
        pend.codes[:, rows] = p.codes
        if p.lo is not None:  # minmax: every slice of a frame carries the frame's range
            pend.lo, pend.hi = p.lo, p.hi
        pend.level = h.level  # every slice of a frame is quantized at the frame's level
        pend.have[rows] = True
        pend.slices += 1
        pend.last_arrival = now
        if h.row_start + h.row_count == h.height:
            pend.saw_last = True
        if pend.have.all() or (pend.saw_last and self.conceal_on_last):
            # complete; or the frame's last slice is in and the sender sends slices in row order
            # on one path, so missing earlier slices are lost, not late: show it now
            out += self._flush(before=h.frame_number)  # (nothing older is left by now)
            out.append(self._emit(self._pending.pop(h.frame_number)))
        return out

    def poll(self) -> list[AssembledFrame]:
        """Frames whose deadline passed (call it periodically, e.g. every few ms)."""
        now = self.clock()
        due = [n for n, p in self._pending.items() if now - p.first_arrival >= self.deadline_s]
        if not due:
            return []
        return self._flush(before=max(due) + 1)

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(p.first_arrival for p in self._pending.values()) + self.deadline_s

    def reset(self) -> None:
        """Forget ordering and pending frames (a new call); keeps the last picture for concealment."""
        self._pending.clear()
        self._last_number = None
        self._last_ts = 0

    # -- internals -------------------------------------------------------------------------
    def _restart(self) -> None:
        self.n.restarts += 1
        self.reset()

    def _new_pending(self, number: int, ts: int, shape: tuple[int, int, int], now: float) -> _Pending:
        if self._prev is not None and self._prev.codes.shape == shape:
            codes = self._prev.codes.copy()
        else:  # nothing to conceal with yet: the middle code (a flat, neutral picture)
            codes = self.codec.neutral_codes(shape)
        return _Pending(number, ts, shape, codes, None, None, np.zeros(shape[1], bool), now, now)

    def _flush(self, before: int) -> list[AssembledFrame]:
        """Hand out every pending frame numbered below `before`, oldest first."""
        out = []
        for n in sorted(k for k in self._pending if k < before):
            out.append(self._emit(self._pending.pop(n)))
        return out

    def _emit(self, p: _Pending) -> AssembledFrame:
        if self._last_number is not None and p.number > self._last_number + 1:
            self.n.lost += p.number - self._last_number - 1
        f = AssembledFrame(p.number, p.timestamp_us, p.codes, p.have, p.lo, p.hi, self._prev,
                           p.first_arrival, p.last_arrival, p.level)
        if f.complete:
            self.n.complete += 1
        else:
            self.n.concealed += 1
        self._last_number, self._last_ts = p.number, p.timestamp_us
        self._prev = f
        return f
