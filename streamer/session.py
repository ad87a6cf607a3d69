"""A call's coding state at the sender: which frame is the reference, I- or P-frame, and when.

The model is stateless (`NeuralCodec` turns one frame into codes); what makes a P-frame possible
is a *reference* held in lock-step at both ends: the codes of the last frame the sender really
sent, which the receiver rebuilt from the same packets (streamer/assembler.py). This module
owns the sender's half (`EncoderSession`) and an offline receiver (`DecoderSession`: the
assembler's reference and the decoder, for evaluations that run both ends in one process):

    session = EncoderSession(codec, max_packet_bytes=1160)
    candidate = session.encode(image, frame_number, timestamp_us)  # I or P, not yet the reference
    if channel.send_frame(candidate.packets):
        session.commit(candidate)        # only a frame that left becomes the reference

A frame the channel dropped was never seen by the receiver, so it must not become the
reference: `encode` returns a candidate and `commit` makes it the reference. The I/P decision
lives here, outside the network (as in DCVC-RT): an I-frame when there is no reference, when
the receiver asked for one (`request_keyframe`, what RTCP PLI is to RTP: its reference broke
after a loss), or every `keyframe_interval` frames; a P-frame otherwise, unless its packets
would be more bytes than the I-frame's (a scene cut: the residuals against another picture cost
more than the picture alone), when the I-frame goes instead. An I-frame replaces the reference
at both ends.

With a learned conditional coder (`learned`, streamer/codec/conditional.py) the P-frames are
its range streams against an *integer* reference in latent space (`EncoderSession.learned_ref`,
which the receiver's assembler rebuilds bit for bit), one packet a frame; recovery is then an
I-frame (a band of intra rows cannot heal a reference that the networks mix across rows), with
the same I/P decision.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .assembler import AssembledFrame, FrameAssembler, codes_crc
from .codec import NeuralCodec, bitstream
from .codec.decision import keep_reference, unrounded_codes
from .codec.quantizer import Quantized
from .codec.residual import residuals
from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .codec.conditional import ConditionalCoder

DEFAULT_KEYFRAME_INTERVAL = 300  # frames (10 s at 30 fps): bounds how long any mismatch can last
RECOVERIES = ("keyframe", "refresh")
DEFAULT_RECOVERY = "refresh"  # measured: bench call at 5 % and 20 % loss (README)
DEFAULT_REFRESH_FRAMES = 7  # a 224 frame's 28 latent rows, 4 a frame: whole again in 233 ms at 30 fps
DEFAULT_DECISION_THRESHOLD = 0.8  # P-frames keep the reference's code within this many steps (measured: decision.py)


class FrameType(enum.IntEnum):
    INTRA = 0  # codes alone: decodes without a reference, and becomes the new one
    INTER = 1  # residuals against the reference (slices may fall back to intra codes)


@dataclass(frozen=True)
class Reference:
    """The codes of the last frame both ends have, and the level they were quantized at."""

    frame_number: int
    codes: np.ndarray  # (C, H, W) uint8
    level: int


@dataclass
class Candidate:
    """One encoded frame, ready to send; becomes the reference only through `commit`."""

    frame_number: int
    timestamp_us: int
    frame_type: FrameType
    q: Quantized
    packets: list[bytes]
    encode_ms: float
    refresh_rows: tuple[int, int] | None = None  # the latent rows a refreshing P-frame sends intra
    learned_ref: "torch.Tensor | None" = None  # learned coding: the integer reference this frame leaves

    @property
    def crc(self) -> int:
        """What the sender sends beside the frame: the CRC of the reference it leaves (its codes;
        a learned P-frame's: the integer reference), which the receiver checks its own against."""
        if self.learned_ref is not None and self.frame_type == FrameType.INTER:
            from .codec.conditional import reference_crc

            return reference_crc(self.learned_ref)
        return codes_crc(self.q.codes)


class EncoderSession:
    def __init__(self, codec: NeuralCodec, *, max_packet_bytes: int | None = None, level: int | None = None,
                 keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL, inter: bool | None = None,
                 decision_threshold: float | Sequence[float] | None = DEFAULT_DECISION_THRESHOLD,
                 recovery: str = DEFAULT_RECOVERY, refresh_frames: int = DEFAULT_REFRESH_FRAMES,
                 learned: "ConditionalCoder | None" = None) -> None:
        """inter: code P-frames (default: when the model has residual tables).
        decision_threshold: a P-frame keeps the reference's code wherever the latent is within
        this many quantizer steps of it (`codec.decision.keep_reference`); one value for every
        level or one per level; 0 or None: off (every code the nearest one).
        recovery: how a broken reference at the receiver (`request_keyframe`) and the periodic
        refresh (`keyframe_interval`) are answered: "keyframe", an I-frame; "refresh", intra
        refresh, a band of latent rows sent intra in each of the next `refresh_frames` P-frames
        (no I-frame's burst of bytes; the picture heals band by band).
        learned: a `conditional.ConditionalCoder` for the P-frames instead of the residual
        tables (step-mode models only); recovery is then always an I-frame."""
        if learned is not None:
            if codec.cfg.quantizer.mode != "step":
                raise ConfigError("learned P-frames need a step-mode quantizer")
            recovery = "keyframe"
        if recovery not in RECOVERIES:
            raise ConfigError(f"recovery must be one of {', '.join(RECOVERIES)}, got {recovery!r}")
        if not (isinstance(refresh_frames, int) and 1 <= refresh_frames <= 255):
            raise ConfigError(f"refresh_frames must be 1..255 frames, got {refresh_frames!r}")
        self.recovery, self.refresh_frames = recovery, refresh_frames
        self.codec = codec
        self.decision_thresholds = _per_level(decision_threshold, codec.levels)
        self.max_packet_bytes = max_packet_bytes
        self.level = codec.quantizer.check_level(level)
        self.keyframe_interval = keyframe_interval
        self.inter = codec.codes_p_frames if inter is None else (inter and codec.codes_p_frames)
        self.reference: Reference | None = None
        self.learned = learned
        self.learned_ref: "torch.Tensor | None" = None  # learned coding: the integer reference both ends hold
        self._gaussian = None
        self._learned_id = 0  # what names the learned coder in its packets
        if learned is not None:
            from .codec.conditional import coder_id, gaussian_coder

            self._gaussian = gaussian_coder()
            self._learned_id = coder_id(learned, codec.model_id)
        self._keyframe_requested = False
        self._since_keyframe = 0
        self.frames = {FrameType.INTRA: 0, FrameType.INTER: 0}  # committed frames of each type
        self.keyframe_requests = 0
        self._recovery_started: int | None = None  # the frame of the last I-frame or refresh start
        self._refresh_from: int | None = None  # a refresh runs: the next band's first latent row
        self._refresh_requested = False

    def request_keyframe(self, broken_at: int | None = None) -> bool:
        """The receiver's reference broke at frame `broken_at` (None: unknown): the next frame
        starts a recovery, an I-frame or a refresh. False, and nothing changes, when a recovery
        begun after that frame is already on its way (the receiver asks until it is whole)."""
        self.keyframe_requests += 1
        if broken_at is not None and self._recovery_started is not None and self._recovery_started > broken_at:
            return False
        if self.recovery == "refresh" and self.reference is not None:
            self._refresh_requested = True
        else:
            self._keyframe_requested = True
        return True

    def _periodic_due(self) -> bool:
        return bool(self.keyframe_interval) and self._since_keyframe >= self.keyframe_interval

    def next_frame_type(self) -> FrameType:
        if not self.inter or self.reference is None or self._keyframe_requested:
            return FrameType.INTRA
        if self._periodic_due() and self.recovery == "keyframe":
            return FrameType.INTRA
        return FrameType.INTER

    def _refresh_rows(self) -> tuple[int, int] | None:
        """The band of latent rows this P-frame sends intra, if a refresh runs or starts now."""
        start = 0 if self._refresh_requested or (self._refresh_from is None and self._periodic_due()) \
            else self._refresh_from
        if start is None:
            return None
        height = self.reference.codes.shape[1] if self.reference is not None else 0
        band = -(-height // self.refresh_frames)
        return (start, min(height, start + band)) if start < height else None

    def encode(self, image: np.ndarray, frame_number: int, timestamp_us: int,
               level: int | None = None) -> Candidate:
        """Encode one frame as the next frame after the reference (which stays as it is)."""
        t0 = time.perf_counter()
        level = self.level if level is None else self.codec.quantizer.check_level(level)
        frame_type = self.next_frame_type()
        if self.learned is not None:
            return self._encode_learned(image, frame_number, timestamp_us, level, frame_type, t0)
        if frame_type == FrameType.INTER:
            assert self.reference is not None
            prediction = self.codec.quantizer.requantize(self.reference.codes, self.reference.level, level)
            threshold = self.decision_thresholds[level]
            refresh = self._refresh_rows()
            if threshold and self.codec.cfg.quantizer.mode == "step":
                latents, nearest = self.codec.encode_with_latents(image, level)
                codes = keep_reference(nearest.codes, unrounded_codes(self.codec.quantizer, latents, level),
                                       prediction, threshold)
                if refresh is not None:  # a refresh band goes intra: its nearest codes, not the reference's
                    codes[:, refresh[0]:refresh[1]] = nearest.codes[:, refresh[0]:refresh[1]]
                q = replace(nearest, codes=codes)  # what is sent is the reference
            else:
                q = nearest = self.codec.encode(image, level)
            packets = self.codec.pack_inter(q, residuals(q.codes, prediction), frame_number, timestamp_us,
                                            self.max_packet_bytes, self.reference.frame_number, refresh)
            # across a scene cut the residuals cost more than the I-frame (measured: 12-14 KB against 3 KB)
            intra = self._intra_if_fewer_bytes(nearest, sum(map(len, packets)), frame_number, timestamp_us)
            if intra is not None:
                return Candidate(frame_number, timestamp_us, FrameType.INTRA, nearest, intra,
                                 (time.perf_counter() - t0) * 1000)
        else:
            q = self.codec.encode(image, level)
            packets = self.codec.pack(q, frame_number, timestamp_us, self.max_packet_bytes)
            refresh = None
        return Candidate(frame_number, timestamp_us, frame_type, q, packets, (time.perf_counter() - t0) * 1000,
                         refresh)

    def _encode_learned(self, image: np.ndarray, frame_number: int, timestamp_us: int, level: int,
                        frame_type: FrameType, t0: float) -> Candidate:
        """An I-frame, or a learned P-frame (one packet) unless it would cost more than the I-frame."""
        import torch

        from .codec import conditional as cond

        if frame_type == FrameType.INTER:
            level = min(level, self.learned.levels - 1)  # the coder's levels are the finest ones
        latents, q = self.codec.encode_with_latents(image, level)
        if frame_type == FrameType.INTER:
            assert self.reference is not None and self.learned_ref is not None
            payload, p_ref = cond.encode_frame(self.learned, self._gaussian, torch.from_numpy(latents)[None],
                                               self.learned_ref, level, cond.SENDER_DEADZONE)
            packet = self.codec.pack_conditional(payload, self._learned_id, frame_number, timestamp_us,
                                                 q.codes.shape, level, self.reference.frame_number,
                                                 cond.reference_crc(p_ref))
            intra = self._intra_if_fewer_bytes(q, len(packet), frame_number, timestamp_us)
            if intra is not None:  # a scene cut: the I-frame is cheaper
                return self._learned_intra(q, intra, frame_number, timestamp_us, t0)
            return Candidate(frame_number, timestamp_us, frame_type, q, [packet], (time.perf_counter() - t0) * 1000,
                             learned_ref=p_ref)
        intra = self.codec.pack(q, frame_number, timestamp_us, self.max_packet_bytes)
        return self._learned_intra(q, intra, frame_number, timestamp_us, t0)

    def _learned_intra(self, q: Quantized, packets: list[bytes], frame_number: int, timestamp_us: int,
                       t0: float) -> Candidate:
        from .codec.conditional import intra_reference

        first, _, step = self.codec.quantizer.grid(q.level)
        return Candidate(frame_number, timestamp_us, FrameType.INTRA, q, packets, (time.perf_counter() - t0) * 1000,
                         learned_ref=intra_reference(q.codes, first, step))

    def _intra_if_fewer_bytes(self, q: Quantized, p_bytes: int, frame_number: int,
                              timestamp_us: int) -> list[bytes] | None:
        """The I/P decision: q's I-frame packets when they are fewer bytes than the P-frame's
        `p_bytes`, else None. The I-frame is packed (1.6-3 ms) only when a bound says it might be."""
        if p_bytes <= self._intra_bytes_at_least(q):
            return None
        intra = self.codec.pack(q, frame_number, timestamp_us, self.max_packet_bytes)
        return intra if p_bytes > sum(map(len, intra)) else None

    def _intra_bytes_at_least(self, q: Quantized) -> float:
        """A bound below the bytes of q's I-frame packets: range-coded slices never come out
        shorter than their ideal code length (the estimate) by more than a word, and raw slices
        are the raw codes; headers come on top."""
        raw = bitstream.packed_size(q.codes.size, q.bits)
        ideal = self.codec.entropy.estimate_bits(q.codes, q.level).sum() / 8 if self.codec.entropy is not None else raw
        return 0.98 * min(float(ideal), float(raw))

    def commit(self, candidate: Candidate) -> None:
        """The candidate was sent: it is the reference now (both ends rebuild the same codes)."""
        self.reference = Reference(candidate.frame_number, candidate.q.codes, candidate.q.level)
        self.learned_ref = candidate.learned_ref
        self.frames[candidate.frame_type] += 1
        if candidate.frame_type == FrameType.INTRA:
            self._keyframe_requested = self._refresh_requested = False
            self._refresh_from = None
            self._since_keyframe = 0
            self._recovery_started = candidate.frame_number
        elif candidate.refresh_rows is not None:
            start, stop = candidate.refresh_rows
            if start == 0:  # a refresh began with this frame
                self._refresh_requested = False
                self._since_keyframe = 0
                self._recovery_started = candidate.frame_number
            self._refresh_from = stop if stop < candidate.q.codes.shape[1] else None
        self._since_keyframe += 1

    def reset(self) -> None:
        """A new call: no reference, so the next frame is an I-frame."""
        self.reference = None
        self.learned_ref = None
        self._keyframe_requested = self._refresh_requested = False
        self._refresh_from = self._recovery_started = None
        self._since_keyframe = 0


def _per_level(threshold: float | Sequence[float] | None, levels: int) -> list[float]:
    """The decision threshold of each quantizer level (0: off), checked."""
    if threshold is None:
        return [0.0] * levels
    values = [threshold] * levels if isinstance(threshold, (int, float)) else list(threshold)
    if len(values) != levels:
        raise ConfigError(f"decision_threshold: {len(values)} values for {levels} quantizer levels")
    try:
        values = [0.0 if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"decision_threshold must be numbers, got {threshold!r}") from None
    if any(not (0 <= v < 1.5) for v in values):  # 1.5 and over would let codes move by 2 steps
        raise ConfigError(f"decision_threshold must be in [0, 1.5) quantizer steps, got {threshold!r}")
    return values


class DecoderSession:
    """The receiving end without a network: packets of each frame in order -> its picture.
    The reference lives in the assembler (as in the call); every frame is decoded."""

    def __init__(self, codec: NeuralCodec, frame_size: int | None = None,
                 learned: "ConditionalCoder | None" = None) -> None:
        """learned: the conditional coder, to decode learned P-frames."""
        self.codec = codec
        self.assembler = FrameAssembler(codec, latent_shape=codec.latent_shape(frame_size), learned=learned)
        self.last: AssembledFrame | None = None

    def decode(self, packets: list[bytes]) -> np.ndarray:
        """One frame's packets (some may be missing: the frame is concealed) -> (H, W, 3) uint8."""
        frames = [f for p in packets for f in self.assembler.add(p)] + self.assembler.flush()
        if frames:
            self.last = frames[-1]
        if self.last is None:
            raise ValueError("no frame decoded yet: its packets were all lost or refused")
        return self.codec.decode_latents(self.last.latents(self.codec))

    @property
    def needs_keyframe(self) -> bool:
        return self.assembler.needs_keyframe
