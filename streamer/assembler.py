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

P-frames. An inter slice carries residuals against the previous frame's codes (carried to its
level), so the assembler keeps the *reference* in lock-step with the sender's: every frame in
order, including the concealed ones, becomes the prediction of the next. The reference is good
(`reference_ok`) after a complete I-frame and stays good through complete P-frames that follow
their reference directly; a lost or concealed frame breaks it, and `needs_keyframe` then asks
the receiver to request an I-frame from the sender (concealment goes on meanwhile: missing rows
and residuals decoded on a broken reference show the old picture's drift only until then).

Learned P-frames (a conditional packet, codec/bitstream.py: one packet, the whole frame) are
the learned coder's range streams against the *integer* reference of the frame they name
(codec/conditional.py). The assembler holds that reference too: the one the previous frame left
(an I- or table P-frame's codes on its level grid, or the last learned frame's integers), and
decodes a learned P-frame on it, in order, when the reference is good and is the frame the
packet names, and checks the packet's CRC of the sender's new reference against its own.
Otherwise (or on a mismatch) the frame is concealed (the last picture: nothing decoded on a
reference that is not the sender's is shown), and the reference stays broken until an I-frame.
The CRC the sender sends beside it (`AssembledFrame.crc`) is then of the integer reference.

Bad packets never raise: corrupt or truncated ones count in `bad_packets`, packets of another
model, quantizer or latent shape in `foreign`; the call goes on.

Work and memory per packet are bounded, whatever a (possibly forged, valid-CRC) packet claims:

* only the latent shape of the call is accepted (`latent_shape`, by default the one the model
  makes for its own `frame_size`; `set_frame_size` when the call's size is known): a packet
  claiming another shape is foreign and refused before its payload is decoded, so nothing of
  the claimed size is ever allocated or decoded;
* frame numbers move in a window: a jump of more than `max_gap` frames (either way) is another
  stream (a restart), not millions of lost or late frames, and one gap adds at most `max_gap`
  to `lost`;
* at most `max_pending` frames wait for slices (a flood of distinct frame numbers does not
  grow memory), and a run of concealed frames nobody decoded keeps at most `MAX_CONCEAL_CHAIN`
  of them alive for concealment.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .codec import NeuralCodec
from .codec.bitstream import ForeignPacketError, Packet
from .errors import PacketError

if TYPE_CHECKING:
    from .codec.conditional import ConditionalCoder

# A slice of the next frame normally ends the wait for a frame's lost slices (one channel, no
# reordering: when frame n+1 starts, n's missing slices are gone). The deadline only covers a
# stream that pauses: a frame is given up once no slice of it came for the deadline. That must
# exceed the gap between one frame's slices, which a loaded 2-core machine (the event loop
# starved) or a lossy link (SCTP's window shrunk) stretches beyond 100 ms. So this is the least
# deadline: it grows to DEADLINE_MARGIN times the widest gap seen in the last SPREAD_WINDOW
# frames (complete ones, and the slices that came after the deadline gave their frame up), up to
# MAX_DEADLINE_S. The least is 200 ms, above the frame interval of any usual rate: in a steady
# stream the next frame's first slice ends the wait first, so waiting longer costs nothing there,
# and a single stall of the event loop (measured past 100 ms with two callers, their sound and
# the server in one process on 2 cores) gives no frame up before the gaps were learnt.
DEFAULT_DEADLINE_S = 0.2
MAX_DEADLINE_S = 1.0
DEADLINE_MARGIN = 1.5
SPREAD_WINDOW = 64
# A frame-number step beyond this (forwards or backwards) is another stream: ~8.5 s at 30 fps.
MAX_FRAME_GAP = 256
# Frames waiting for slices at once. In order on one channel only one frame is open at a time
# (a slice of frame n+1 closes n); reordering opens a second or third.
MAX_PENDING = 8
# Concealed frames whose latents were never built, kept for the next frame's concealment.
MAX_CONCEAL_CHAIN = 4


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
                 first_arrival: float, last_arrival: float, level: int = 0, inter: bool = False,
                 reference_ok: bool = True) -> None:
        self.frame_number = frame_number
        self.timestamp_us = timestamp_us  # sender's capture time
        self.codes = codes  # (C, H, W) uint8; missing rows hold the previous frame's codes
        self.have = have  # bool per latent row
        self.lo, self.hi = lo, hi  # minmax range (None: the model's fixed range)
        self.level = level  # step mode: the quantizer level of the frame's slices
        self.inter = inter  # some slice held residuals against the previous frame
        self.reference_ok = reference_ok  # these codes are the sender's (as far as the receiver knows)
        self._prev = prev if not have.all() else None
        self._latents: torch.Tensor | None = None
        self.learned_ref: torch.Tensor | None = None  # a learned P-frame's integer reference
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
        if self.learned_ref is not None:
            from .codec.conditional import reference_crc

            return reference_crc(self.learned_ref)
        return codes_crc(self.codes)

    def latents(self, codec: NeuralCodec) -> torch.Tensor:
        """(1, C, H, W) float32 for `codec.decode_latents` (cached)."""
        if self._latents is None and self.learned_ref is not None:
            from .codec.conditional import REF_FRAC

            self._latents = self.learned_ref / (1 << REF_FRAC)
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
    inter: bool = False
    ref_number: int | None = None  # the frame its prediction came from (our previous frame)
    mispredicted: bool = False  # residuals for another reference than ours (named, or out of range)
    intra_rows: np.ndarray | None = None  # bool per latent row: arrived as intra codes
    bad_rows: np.ndarray | None = None  # bool per latent row: residuals that cannot apply to ours
    wrong_ref: bool = False  # some slice named another reference than our previous frame
    widest_gap: float = 0.0  # s, between two of its slices' arrivals
    learned_ref: torch.Tensor | None = None  # a decoded learned P-frame's integer reference


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
    mispredicted: int = 0  # inter frames coded against another reference than ours
    learned: int = 0  # learned P-frames decoded
    learned_undecodable: int = 0  # learned P-frames on a reference we lack (or that did not decode)
    learned_mismatched: int = 0  # ... decoded, but to a reference whose CRC is not the sender's
    last_error: str = field(default="", repr=False)


class FrameAssembler:
    def __init__(self, codec: NeuralCodec, deadline_s: float = DEFAULT_DEADLINE_S,
                 clock: Callable[[], float] = time.monotonic, conceal_on_last: bool = True, *,
                 latent_shape: tuple[int, int, int] | None = None, max_gap: int = MAX_FRAME_GAP,
                 max_pending: int = MAX_PENDING, learned: "ConditionalCoder | None" = None) -> None:
        """latent_shape: the whole frame's latent (C, H, W) this call accepts (default: what the
        codec's model makes for `codec.frame_size`; see `set_frame_size`). learned: the
        conditional coder that decodes learned P-frames (None: they are refused as foreign)."""
        self.codec = codec
        self.learned = learned
        self._gaussian = None
        self._learned_id: int | None = None  # learned P-frames of another coder are foreign
        if learned is not None:
            from .codec.conditional import coder_id, gaussian_coder

            self._gaussian = gaussian_coder()
            self._learned_id = coder_id(learned, codec.model_id)
        self.deadline_s = deadline_s  # the least; `current_deadline_s` adapts above it
        self._gaps: deque[float] = deque(maxlen=SPREAD_WINDOW)  # widest gap between a frame's slices, s
        self._given_up: OrderedDict[int, float] = OrderedDict()  # frame -> its last slice's arrival
        self.conceal_on_last = conceal_on_last
        self.clock = clock
        if max_gap < 1 or max_pending < 1:
            raise ValueError(f"max_gap ({max_gap}) and max_pending ({max_pending}) must be at least 1")
        self.max_gap, self.max_pending = int(max_gap), int(max_pending)
        self.n = AssemblerCounters()
        self.reference_ok = False  # no frame yet: nothing to predict from
        self._rows_ok: np.ndarray | None = None  # per latent row: our reference's row is the sender's
        self.broken_at: int | None = None  # the newest frame that broke (rows of) the reference
        self._alphabets: dict[int, np.ndarray] = {}
        self._pending: dict[int, _Pending] = {}
        self._last_number: int | None = None  # newest frame handed out
        self._last_ts = 0
        self._prev: AssembledFrame | None = None
        self._shape = self._valid_shape(codec.latent_shape() if latent_shape is None else latent_shape)

    # -- the call's latent shape -----------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The only whole-frame latent (C, H, W) accepted; packets of another are foreign."""
        return self._shape

    @latent_shape.setter
    def latent_shape(self, shape: tuple[int, int, int]) -> None:
        shape = self._valid_shape(shape)
        if shape != self._shape:
            self._pending.clear()  # frames of the old shape will not complete
            self._shape = shape

    def set_frame_size(self, height: int, width: int | None = None) -> None:
        """Accept the latents of height x width frames (width: default height, a square) from
        now on, e.g. once the call's frame size is known; FrameSizeError if the model cannot
        code that size."""
        self.latent_shape = self.codec.latent_shape(height, width)

    def _valid_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        try:
            c, h, w = (int(v) for v in shape)
        except (TypeError, ValueError):
            raise ValueError(f"a latent shape is (channels, height, width), got {shape!r}") from None
        if c != self.codec.cfg.model.latent_channels or h < 1 or w < 1:
            raise ValueError(f"latent shape {shape!r}: the model makes {self.codec.cfg.model.latent_channels} "
                             f"channels and at least one row and column")
        return c, h, w

    # -- input -----------------------------------------------------------------------------
    def add(self, data: bytes) -> list[AssembledFrame]:
        """One data-channel message in; the frames that became ready out (oldest first)."""
        now = self.clock()
        self.n.packets += 1
        self.n.bytes += len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
        try:
            p = self.codec.unpack(data, expect_shape=self._shape, learned_id=self._learned_id)
        except ForeignPacketError as e:  # intact, but another model, quantizer or latent shape
            self.n.foreign += 1
            self.n.last_error = str(e)
            return []
        except PacketError as e:
            self.n.bad_packets += 1
            self.n.last_error = str(e)
            return []
        except Exception as e:  # noqa: BLE001 - a decoder bug on hostile input must not end the call
            self.n.bad_packets += 1
            self.n.last_error = f"{type(e).__name__}: {e}"
            return []
        return self._add_packet(p, now)

    def _add_packet(self, p: Packet, now: float) -> list[AssembledFrame]:
        h = p.header
        out: list[AssembledFrame] = []
        number = h.frame_number
        ref = self._last_number if self._last_number is not None else max(self._pending, default=None)
        if ref is not None and abs(number - ref) > self.max_gap:
            self._restart()  # another stream (or a forged number): not thousands of lost or late frames
        elif self._last_number is not None and number <= self._last_number:
            if h.timestamp_us > self._last_ts:
                self._restart()  # the sender started again: numbers restart, the clock went on
            else:
                self.n.late += 1
                given_up = self._given_up.get(number)
                if given_up is not None:  # the deadline was too short for this link or machine
                    self._gaps.append(now - given_up)
                    self._given_up[number] = now
                return out
        pend = self._pending.get(number)
        shape = (h.channels, h.height, h.width)
        if pend is None:
            # a newer frame began: older unfinished frames will not improve (unreliable channel)
            out += self._flush(before=number)
            if len(self._pending) >= self.max_pending:  # all newer than this one: it is too late
                self.n.late += 1
                return out
            pend = self._new_pending(number, h.timestamp_us, shape, now, h.level)
            self._pending[number] = pend
        elif pend.shape != shape or pend.level != h.level:
            self.n.bad_packets += 1
            self.n.last_error = (f"slice of shape {shape} at level {h.level}; its frame's are "
                                 f"{pend.shape} at level {pend.level}")
            return out
        rows = slice(h.row_start, h.row_start + h.row_count)
        if pend.have[rows].all():
            self.n.duplicate += 1
            return out
        if p.conditional is not None:
            pend.inter = True
            pend.learned_ref = self._decode_learned(p)
            if pend.learned_ref is None:  # concealed: the previous picture, and the reference broken
                self._pending.pop(number)
                out.append(self._emit(pend))
                return out
            # its codes on its level's grid: what the next frame's prediction and concealment start from
            from .codec.conditional import REF_FRAC

            pend.codes = self.codec.quantizer.quantize(pend.learned_ref / (1 << REF_FRAC), h.level)[0].codes
        elif p.residual is not None:  # prediction (already in pend.codes) + residual
            sizes = self._sizes(h.level)
            codes = pend.codes[:, rows].astype(np.int16) + p.residual
            top = (sizes - 1)[:, None, None]
            # coded against a frame we do not hold, or residuals that leave the codes' range on
            # ours: applied all the same (the nearest picture we can show), but these rows of
            # our reference are not the sender's
            wrong_ref = h.ref_frame_number != pend.ref_number
            outside = ((codes < 0) | (codes > top)).any(axis=(0, 2))  # per row of the slice
            if wrong_ref or outside.any():
                codes = np.clip(codes, 0, top)
                self.n.mispredicted += not pend.mispredicted
                pend.mispredicted = True
                pend.wrong_ref |= wrong_ref
                pend.bad_rows[rows] |= True if wrong_ref else outside
            pend.codes[:, rows] = codes.astype(np.uint8)
            pend.inter = True
        else:
            pend.codes[:, rows] = p.codes
            pend.intra_rows[rows] = True
        if p.lo is not None:  # minmax: every slice of a frame carries the frame's range
            pend.lo, pend.hi = p.lo, p.hi
        pend.have[rows] = True
        pend.slices += 1
        pend.widest_gap = max(pend.widest_gap, now - pend.last_arrival)
        pend.last_arrival = now
        if h.row_start + h.row_count == h.height:
            pend.saw_last = True
        if pend.have.all():
            self._gaps.append(pend.widest_gap)
        if pend.have.all() or (pend.saw_last and self.conceal_on_last):
            # complete; or the frame's last slice is in and the sender sends slices in row order
            # on one path, so missing earlier slices are lost, not late: show it now
            out += self._flush(before=number)  # (nothing older is left by now)
            out.append(self._emit(self._pending.pop(number)))
        return out

    def _decode_learned(self, p: Packet) -> torch.Tensor | None:
        """A learned P-frame's integer reference, decoded on ours; None when we lack the reference
        it names (or it is broken, or the payload does not decode)."""
        from .codec import conditional as cond

        h, prev = p.header, self._prev
        if (self.learned is None or prev is None or not self.reference_ok or prev.frame_number != h.ref_frame_number
                or h.level >= self.learned.levels):
            self.n.learned_undecodable += 1
            return None
        ref = prev.learned_ref
        if ref is None:  # an I- or table P-frame: its codes on their level's grid
            first, _, step = self.codec.quantizer.grid(prev.level)
            ref = cond.intra_reference(prev.codes, first, step)
        try:
            out = cond.decode_frame(self.learned, self._gaussian, p.conditional, ref, h.level)
        except PacketError as e:
            self.n.learned_undecodable += 1
            self.n.last_error = str(e)
            return None
        if cond.reference_crc(out) != p.conditional_crc:  # ours was not the sender's: never shown
            self.n.learned_mismatched += 1
            self.n.last_error = f"frame {h.frame_number}: the learned reference's CRC is not the sender's"
            return None
        self.n.learned += 1
        return out

    def poll(self) -> list[AssembledFrame]:
        """Frames whose deadline passed (call it periodically, e.g. every few ms)."""
        now = self.clock()
        deadline = self.current_deadline_s
        due = [n for n, p in self._pending.items() if now - p.last_arrival >= deadline]
        if not due:
            return []
        for n in due:  # remembered a while: a slice that still comes says how late they run
            self._given_up[n] = self._pending[n].last_arrival
        while len(self._given_up) > MAX_PENDING:
            self._given_up.popitem(last=False)
        return self._flush(before=max(due) + 1)

    def flush(self) -> list[AssembledFrame]:
        """Hand out every pending frame now (offline decoding: nothing more will arrive)."""
        return self._flush(before=max(self._pending, default=-1) + 1)

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(p.last_arrival for p in self._pending.values()) + self.current_deadline_s

    @property
    def current_deadline_s(self) -> float:
        """How long a frame waits for its next slice: at least `deadline_s`, more where slices
        have recently come further apart (a loaded machine, a lossy link), bounded."""
        widest = max(self._gaps, default=0.0)
        return min(max(self.deadline_s, DEADLINE_MARGIN * widest), max(self.deadline_s, MAX_DEADLINE_S))

    @property
    def needs_keyframe(self) -> bool:
        """The reference is broken (a frame was lost or concealed): ask the sender for an I-frame."""
        return self._last_number is not None and not self.reference_ok

    def _sizes(self, level: int) -> np.ndarray:
        if level not in self._alphabets:
            self._alphabets[level] = self.codec.quantizer.alphabet(level)[0]
        return self._alphabets[level]

    def mark_broken(self, frame_number: int) -> None:
        """Our reference is known not to be the sender's (e.g. a CRC of frame `frame_number`
        did not match): every row needs recovery."""
        if self._rows_ok is not None:
            self._rows_ok[:] = False
        self.reference_ok = False
        self.broken_at = frame_number

    def reset(self) -> None:
        """Forget ordering and pending frames (a new call); keeps the last picture for concealment."""
        self.reference_ok = False
        self._rows_ok = None
        self._pending.clear()
        self._last_number = None
        self._last_ts = 0

    # -- internals -------------------------------------------------------------------------
    def _restart(self) -> None:
        self.n.restarts += 1
        self.reset()

    def _new_pending(self, number: int, ts: int, shape: tuple[int, int, int], now: float,
                     level: int = 0) -> _Pending:
        """A frame's codes start as the prediction from the previous frame (the previous codes on
        this frame's level grid): what inter slices add residuals to and lost rows keep."""
        prev = self._prev
        if prev is not None and prev.codes.shape == shape:
            codes = self.codec.quantizer.requantize(prev.codes, prev.level, level).copy()
            ref = prev.frame_number
        else:  # nothing to conceal with yet: the middle code (a flat, neutral picture)
            codes, ref = self.codec.neutral_codes(shape), None
        return _Pending(number, ts, shape, codes, None, None, np.zeros(shape[1], bool), now, now, level,
                        ref_number=ref, intra_rows=np.zeros(shape[1], bool), bad_rows=np.zeros(shape[1], bool))

    def _flush(self, before: int) -> list[AssembledFrame]:
        """Hand out every pending frame numbered below `before`, oldest first."""
        out = []
        for n in sorted(k for k in self._pending if k < before):
            out.append(self._emit(self._pending.pop(n)))
        return out

    def _emit(self, p: _Pending) -> AssembledFrame:
        if self._last_number is not None and p.number > self._last_number + 1:
            self.n.lost += min(p.number - self._last_number - 1, self.max_gap)
        # the reference row by row (a P-frame's residuals on a row depend on that row of the
        # reference alone): a row is the sender's if it arrived intra, or arrived as residuals on
        # a row that was the sender's, against the frame they name; a lost row is not
        prev_ok = self._rows_ok if self._rows_ok is not None and self._rows_ok.shape == p.have.shape \
            else np.zeros_like(p.have)
        rows_ok = p.intra_rows | (p.have & prev_ok & ~p.bad_rows)
        if not p.have.all() or p.wrong_ref or (p.bad_rows & prev_ok).any():
            # the newest frame with a defect of its own (a lost row, residuals for a frame we
            # lack, or out of range on a row we thought good): what a recovery must come after.
            # A whole frame on rows already broken is not one (its residuals may well leave the
            # range there): the recovery asked for before still answers it.
            self.broken_at = p.number
        self._rows_ok = rows_ok
        self.reference_ok = bool(rows_ok.all())
        f = AssembledFrame(p.number, p.timestamp_us, p.codes, p.have, p.lo, p.hi, self._prev,
                           p.first_arrival, p.last_arrival, p.level, p.inter, self.reference_ok)
        f.learned_ref = p.learned_ref
        if f.complete:
            self.n.complete += 1
        else:
            self.n.concealed += 1
        self._last_number, self._last_ts = p.number, p.timestamp_us
        self._prev = f
        # concealed frames nobody decoded chain back to the last decoded or complete one: cut the
        # chain so a long run of them cannot hold every frame's codes (the oldest kept conceals
        # with the codes it inherited, which are already the previous frame's)
        node, depth = f, 0
        while node._prev is not None:
            depth += 1
            if depth >= MAX_CONCEAL_CHAIN:
                node._prev = None
                break
            node = node._prev
        return f
