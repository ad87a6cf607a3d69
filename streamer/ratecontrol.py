"""Rate control: which quantizer level to code the next frame at, to hold a bitrate target.

Pure Python (no torch, no networking): the sender asks for a level before each frame, reports
the bytes each frame really produced, and forwards the receiver's channel reports.

    rc = RateController(target_kbps=300, fps=30, levels=len(steps))
    level = rc.level_for_next_frame(FrameType.INTER)
    ... encode at `level`, send (or drop) ...
    rc.frame_sent(len(packet_bytes), level, FrameType.INTER, t=capture_time_s)
    rc.channel_feedback(loss=0.0, delay_ms=48.0, buffered_bytes=dc.bufferedAmount)

How it works:

- A **virtual buffer** (leaky bucket) fills with each frame's bits and drains at the effective
  target for the time that passed (one frame interval when no time is given). Its content is the
  queueing delay the stream would build on a link of exactly the target rate, so holding it near
  a small set point holds the average rate at the target with bounded latency. Each P-frame's
  budget is one frame's drain minus the buffer's distance from the set point spread over
  `horizon_s` (1 s): an I-frame's overshoot is paid back by ~30 slightly smaller P-frames
  instead of one level jump. The buffer is the integral of the rate error, so the achieved rate
  has no steady-state error.
- A **rate model** per frame type, log2(bits) = c[type] - k * level (bits ~ a * 2^(-k*level)),
  turns a budget into a (fractional) level. c[INTER] follows every P-frame, the I-frame's offset
  over it (prior: 2.5x) follows every I-frame, and the slope k (prior: 2/3, i.e. one √2 step of
  the default ladder ~0.63x the bits) is learned from consecutive P-frames at different levels.
  Nothing assumes a ladder length beyond `levels`: a finer ladder only needs another `bits_slope`.
- The integer level changes only when the wanted level leaves a **hysteresis** band around the
  current one and by at most `max_step` levels per frame, so the picture does not flicker
  between levels every frame; `q_for_next_frame` gives the continuous level for a quantizer
  that can interpolate its step.
- **Congestion**: an aiortc data channel has no delay-based congestion control, so the
  receiver's reports cap the target: loss over 10 % cuts it by (1 - loss/2) (as WebRTC's
  loss-based controller), a growing one-way delay or a backed-up send buffer by 15 %, at most
  once per `decrease_interval_s`; when reports are clean it recovers by 8 % per second.
"""

from __future__ import annotations

import enum
import math
from collections import deque

from .errors import ConfigError


class FrameType(enum.IntEnum):
    """A frame's coding type; the values are the packet header's `frame type` byte.

    `streamer.session.FrameType` has the same values; it is not imported because session pulls
    in torch. Either enum (or a plain 0/1) works wherever this module takes a frame type."""

    INTRA = 0  # coded alone (an I-frame, a keyframe)
    INTER = 1  # coded against the previous frame (a P-frame)


class Saturation(enum.IntEnum):
    """Whether the ladder's end stops the controller from reaching the target."""

    NONE = 0
    FINEST = 1  # even level 0 spends less than the target (the target is higher than needed)
    COARSEST = 2  # even the coarsest level spends more than the target (frames should be dropped)


_INTRA_PRIOR = math.log2(2.5)  # I-frames cost ~2-3x a P-frame before one is seen
_MIN_BITS = 8.0  # log2 of a zero-byte frame would be -inf
_LOSS_DECREASE = 0.10  # above this loss, cut the rate (WebRTC GCC's loss thresholds)
_LOSS_HOLD = 0.02  # between the two, hold: random loss is not cured by sending less


def _check_positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return v


class RateController:
    """Chooses the quantizer level of each frame (0 = finest, `levels` - 1 = coarsest).

    target_kbps: the bitrate to hold (kbit/s of packet bytes); fps: the frame rate, which sets
    one frame's share of the target when frames carry no time. Keyword options:
    start_level (default: the middle of the ladder) is used until a frame has been seen;
    bits_slope: prior log2 of the bits ratio between adjacent levels; setpoint_s, max_buffer_s:
    the virtual buffer's set point and cap, in seconds at the target; horizon_s: over how long
    a buffer error (an I-frame's overshoot) is paid back; hysteresis: how far (in levels) past
    the midpoint between two levels the wanted level must go before the level changes;
    max_step: most levels the level moves per frame; intra_max_frames: an I-frame may cost at
    most this many frame budgets before it is coded coarser; skip_above_s: buffer delay above
    which `should_skip_frame` says to drop; min_kbps: the congestion cap's floor.
    """

    def __init__(self, target_kbps: float, fps: float, levels: int, *, start_level: int | None = None,
                 bits_slope: float = 2 / 3, setpoint_s: float = 0.1, max_buffer_s: float = 1.0,
                 horizon_s: float = 1.0, hysteresis: float = 0.2, max_step: float = 1.0,
                 intra_max_frames: float = 4.0, skip_above_s: float = 0.5, min_kbps: float = 20.0,
                 decrease_interval_s: float = 1.0, recovery_per_s: float = 1.08,
                 delay_threshold_ms: float = 60.0, buffered_threshold_s: float = 0.25) -> None:
        self._target_bps = _check_positive("target_kbps", target_kbps) * 1000.0
        self.fps = _check_positive("fps", fps)
        if not (isinstance(levels, int) and levels >= 1):
            raise ConfigError(f"levels must be an integer >= 1, got {levels!r}")
        self.levels = levels
        if start_level is None:
            start_level = (levels - 1) // 2
        if not (isinstance(start_level, int) and 0 <= start_level < levels):
            raise ConfigError(f"start_level {start_level!r} outside 0..{levels - 1}")
        if not (isinstance(hysteresis, (int, float)) and 0 <= hysteresis < 1):
            raise ConfigError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
        self.setpoint_s = _check_positive("setpoint_s", setpoint_s)
        self.max_buffer_s = max(_check_positive("max_buffer_s", max_buffer_s), self.setpoint_s * 2)
        self.horizon_s = _check_positive("horizon_s", horizon_s)
        self.hysteresis = float(hysteresis)
        self.max_step = _check_positive("max_step", max_step)
        self.intra_max_frames = _check_positive("intra_max_frames", intra_max_frames)
        self.skip_above_s = _check_positive("skip_above_s", skip_above_s)
        self.min_bps = _check_positive("min_kbps", min_kbps) * 1000.0
        self.decrease_interval_s = float(decrease_interval_s)
        self.recovery_per_s = max(1.0, float(recovery_per_s))
        self.delay_threshold_ms = _check_positive("delay_threshold_ms", delay_threshold_ms)
        self.buffered_threshold_s = _check_positive("buffered_threshold_s", buffered_threshold_s)

        # rate model: log2(bits) = c_inter + (intra_offset if I) - slope * level
        self._slope0 = _check_positive("bits_slope", bits_slope)
        self.slope = self._slope0
        self._c_inter: float | None = None
        self.intra_offset = _INTRA_PRIOR
        self._last_p: tuple[float, float] | None = None  # (level, log2 bits) of the last P-frame

        self._buffer = 0.0  # bits
        self._now: float | None = None  # time of the last frame (s), on a clock that never steps back
        self._clock_offset = 0.0  # added to callers' times after their clock stepped back
        self._last_level: float = float(start_level)  # level of the last frame, any type
        self._last_p_level: float = float(start_level)  # the reference for hysteresis
        self._window: deque[tuple[float, float]] = deque()  # (t, bits) over the last second
        self._t0: float | None = None
        self._total_bits = 0.0
        self.frames = 0
        self._sat_count = 0
        self._sat_kind = Saturation.NONE
        self.saturation = Saturation.NONE

        self._cap_bps: float | None = None  # congestion cap; None: none
        self._last_decrease: float | None = None
        self._last_feedback_t: float | None = None
        self._delay_base: deque[tuple[float, float]] = deque()  # (t, delay) for the 10 s minimum
        self._queue_ms = 0.0  # smoothed one-way queueing delay above the minimum
        self._queue_hist: deque[tuple[float, float]] = deque()  # (t, queue_ms) over ~1 s
        self.congested = False

    # ---- targets -------------------------------------------------------------------------

    @property
    def target_kbps(self) -> float:
        """The target the page or the command line set."""
        return self._target_bps / 1000.0

    @property
    def effective_target_kbps(self) -> float:
        """The target actually held: the set target, lowered while the channel is congested."""
        return self._eff_bps / 1000.0

    @property
    def _eff_bps(self) -> float:
        if self._cap_bps is None:
            return self._target_bps
        return min(self._target_bps, self._cap_bps)

    def set_target(self, kbps: float) -> None:
        """Change the target (live). The buffer keeps its bits: what is queued is queued."""
        self._target_bps = _check_positive("target kbps", kbps) * 1000.0
        if self._cap_bps is not None and self._cap_bps >= self._target_bps:
            self._cap_bps = None
        self._clamp_buffer()

    # ---- stats -----------------------------------------------------------------------------

    @property
    def rate_kbps(self) -> float:
        """kbit/s produced over the last second (less at the start: since the first frame)."""
        if not self._window or self._now is None or self._t0 is None:
            return 0.0
        span = min(1.0, self._now - self._t0 + 1.0 / self.fps)
        return sum(b for _, b in self._window) / span / 1000.0

    @property
    def mean_kbps(self) -> float:
        """kbit/s produced since the first frame."""
        if self._now is None or self._t0 is None:
            return 0.0
        return self._total_bits / (self._now - self._t0 + 1.0 / self.fps) / 1000.0

    @property
    def buffer_bits(self) -> float:
        return self._buffer

    @property
    def buffer_ms(self) -> float:
        """The virtual buffer as delay at the effective target: the queueing it would cause."""
        return self._buffer / self._eff_bps * 1000.0

    @property
    def buffer_fullness(self) -> float:
        """The virtual buffer as a fraction of its cap (0..1)."""
        return self._buffer / (self.max_buffer_s * self._eff_bps)

    @property
    def level(self) -> float:
        """The level of the last frame reported."""
        return self._last_level

    @property
    def saturated(self) -> bool:
        return self.saturation != Saturation.NONE

    def stats(self) -> dict[str, float | int | str | bool]:
        """Everything above, for a stats line or JSON."""
        return {"target_kbps": round(self.target_kbps, 1),
                "effective_target_kbps": round(self.effective_target_kbps, 1),
                "kbps": round(self.rate_kbps, 1), "mean_kbps": round(self.mean_kbps, 1),
                "buffer_ms": round(self.buffer_ms, 1), "buffer_fullness": round(self.buffer_fullness, 3),
                "level": self._last_level, "q": round(self.wanted_q(FrameType.INTER), 2),
                "saturation": self.saturation.name.lower(), "congested": self.congested,
                "slope": round(self.slope, 3), "intra_ratio": round(2 ** self.intra_offset, 2),
                "frames": self.frames}

    # ---- decisions -------------------------------------------------------------------------

    def _budget(self, frame_type: FrameType) -> float:
        """Bits the next frame may spend."""
        drain = self._eff_bps / self.fps
        if frame_type == FrameType.INTRA:
            return drain * self.intra_max_frames  # a cap, not a goal: I-frames keep the P level
        # pay a buffer error back over the horizon, not all in the next frame
        err = self._buffer - self.setpoint_s * self._eff_bps
        return max(drain - err / (self.horizon_s * self.fps), 0.1 * drain)

    def wanted_q(self, frame_type: FrameType) -> float:
        """The unbounded continuous level the rate model says meets the budget (may lie
        outside 0..levels-1: that is what saturation means); the start level before any frame."""
        if self._c_inter is None:
            return self._last_level
        c = self._c_inter + (self.intra_offset if frame_type == FrameType.INTRA else 0.0)
        return (c - math.log2(self._budget(frame_type))) / self.slope

    def _clip(self, q: float) -> float:
        return min(max(q, 0.0), float(self.levels - 1))

    def q_for_next_frame(self, frame_type: FrameType = FrameType.INTER) -> float:
        """Continuous level in [0, levels-1], moving at most `max_step` per frame: for a
        quantizer that interpolates its step between ladder entries. Does not change state."""
        frame_type = FrameType(frame_type)
        want = self.wanted_q(frame_type)
        if frame_type == FrameType.INTRA:
            # the I-frame keeps the P-frames' quality unless it would cost over its cap
            want = max(want, self._last_p_level)
        else:
            # half-way each frame: the per-frame noise of the model is not worth following
            want = self._last_p_level + 0.5 * (want - self._last_p_level)
        lo, hi = self._last_level - self.max_step, self._last_level + self.max_step
        return self._clip(min(max(want, lo), hi))

    def level_for_next_frame(self, frame_type: FrameType = FrameType.INTER) -> int:
        """The ladder level (0..levels-1) to code the next frame at. Changes only when the
        wanted level leaves the hysteresis band, by at most `max_step` (>= 1) levels a frame.
        Does not change state: calling it twice gives the same answer."""
        frame_type = FrameType(frame_type)
        ref = round(self._last_p_level)
        want = self.wanted_q(frame_type)
        if frame_type == FrameType.INTRA:
            level = max(ref, math.ceil(want - 1e-9))  # coarser only if it would bust its cap
        elif want > ref + 0.5 + self.hysteresis or want < ref - 0.5 - self.hysteresis:
            level = math.floor(want + 0.5)
        else:
            level = ref
        step = max(1, math.floor(self.max_step))
        last = round(self._last_level)
        level = min(max(level, last - step), last + step)
        return int(self._clip(level))

    def should_skip_frame(self) -> bool:
        """True when the buffer holds more than `skip_above_s` of data even after the next
        frame interval drains: the sender should drop the frame rather than add latency."""
        return self._buffer - self._eff_bps / self.fps > self.skip_above_s * self._eff_bps

    # ---- reports ---------------------------------------------------------------------------

    def _advance(self, t: float | None) -> float:
        """Move the clock to the frame's time and drain the buffer for the time that passed."""
        if t is None:
            now = 0.0 if self._now is None else self._now + 1.0 / self.fps
        else:
            now = float(t) + self._clock_offset
            if self._now is not None and now < self._now:
                # a clock that steps back (a restarted source): carry on one frame later
                self._clock_offset += self._now + 1.0 / self.fps - now
                now = self._now + 1.0 / self.fps
        dt = 1.0 / self.fps if self._now is None else now - self._now
        self._buffer = max(0.0, self._buffer - dt * self._eff_bps)
        self._now = now
        if self._t0 is None:
            self._t0 = now
        return now

    def _clamp_buffer(self) -> None:
        # anti-windup: a buffer grown during saturation must not keep the level coarse for long
        self._buffer = min(self._buffer, self.max_buffer_s * self._eff_bps)

    def frame_dropped(self, t: float | None = None) -> None:
        """A frame interval passed with nothing sent (only needed when frames carry no time)."""
        self._advance(t)

    def frame_sent(self, nbytes: int, level: float, frame_type: FrameType = FrameType.INTER,
                   t: float | None = None) -> None:
        """Report a frame that was sent: its bytes on the wire, the level it was coded at
        (which need not be the one suggested) and its type; t: its time in seconds (capture
        time; default: one frame interval after the previous frame)."""
        frame_type = FrameType(frame_type)
        if not (isinstance(nbytes, (int, float)) and nbytes >= 0 and math.isfinite(nbytes)):
            raise ConfigError(f"frame bytes must be a non-negative number, got {nbytes!r}")
        level = float(level)
        if not (0 <= level <= self.levels - 1):
            raise ConfigError(f"level {level!r} outside 0..{self.levels - 1}")
        now = self._advance(t)
        bits = 8.0 * nbytes
        self._buffer += bits
        self._clamp_buffer()
        self._total_bits += bits
        self._window.append((now, bits))
        while self._window and self._window[0][0] <= now - 1.0:
            self._window.popleft()
        self.frames += 1
        self._learn(math.log2(max(bits, _MIN_BITS)), level, frame_type)
        self._last_level = level
        if frame_type == FrameType.INTER:
            self._last_p_level = level
        self._update_saturation(level)

    def _learn(self, y: float, level: float, frame_type: FrameType) -> None:
        if frame_type == FrameType.INTER:
            if self._last_p is not None and abs(level - self._last_p[0]) >= 0.5:
                # adjacent P-frames differ mostly by the level: their ratio measures the slope
                k_obs = -(y - self._last_p[1]) / (level - self._last_p[0])
                k_obs = min(max(k_obs, self._slope0 / 3), self._slope0 * 3)
                self.slope += 0.05 * (k_obs - self.slope)
            self._last_p = (level, y)
            obs = y + self.slope * level
            self._c_inter = obs if self._c_inter is None else self._c_inter + 0.25 * (obs - self._c_inter)
            return
        obs = y + self.slope * level  # an I-frame: its offset over P learns fast (they are rare)
        if self._c_inter is None:
            self._c_inter = obs - self.intra_offset
            return
        r = obs - (self._c_inter + self.intra_offset)
        self.intra_offset = min(max(self.intra_offset + 0.3 * r, 0.0), 4.0)
        self._c_inter += 0.25 * r  # part of the surprise is the scene (a cut): P-frames share it
        self._last_p = None  # the next P-frame follows an I-frame: no slope pair across it

    def _update_saturation(self, level: float) -> None:
        want = self.wanted_q(FrameType.INTER)
        kind = Saturation.NONE
        if level >= self.levels - 1 and want > self.levels - 1:
            kind = Saturation.COARSEST
        elif level <= 0 and want < 0:
            kind = Saturation.FINEST
        # a quarter second in a row: the ends are touched in passing while dithering
        self._sat_count = self._sat_count + 1 if kind == self._sat_kind and kind != Saturation.NONE else 1
        self._sat_kind = kind
        if kind == Saturation.NONE:
            self.saturation = Saturation.NONE
        elif self._sat_count >= max(1, round(0.25 * self.fps)):
            self.saturation = kind

    def channel_feedback(self, loss: float, delay_ms: float | None = None, buffered_bytes: int | None = None,
                         t: float | None = None) -> float:
        """A report on the channel; returns the effective target (kbps).

        loss: fraction (0..1) of frames or packets lost since the last report (the receiver's
        count); delay_ms: one-way delay of recent frames as the receiver measures it (any
        constant clock offset is fine: only its rise above the 10 s minimum counts); buffered_bytes:
        the sender data channel's bufferedAmount (bytes SCTP has not sent yet); t: time of the
        report in seconds (default: the last frame's time)."""
        loss = float(loss)
        if not (0.0 <= loss <= 1.0):
            raise ConfigError(f"loss must be a fraction in 0..1, got {loss!r}")
        now = self._now if t is None else float(t) + self._clock_offset
        if now is None:
            now = 0.0
        eff = self._eff_bps
        overuse = loss > _LOSS_DECREASE
        factor = 1.0 - 0.5 * loss if overuse else 1.0
        if delay_ms is not None and math.isfinite(delay_ms):
            self._delay_base.append((now, float(delay_ms)))
            while self._delay_base and self._delay_base[0][0] < now - 10.0:
                self._delay_base.popleft()
            queue = float(delay_ms) - min(d for _, d in self._delay_base)
            self._queue_ms += 0.5 * (queue - self._queue_ms)
            self._queue_hist.append((now, self._queue_ms))
            while self._queue_hist and self._queue_hist[0][0] < now - 1.0:
                self._queue_hist.popleft()
            rising = self._queue_ms - self._queue_hist[0][1] > 0.5 * self.delay_threshold_ms
            # a queue at the bottleneck: delay well above its floor, or climbing fast
            if self._queue_ms > self.delay_threshold_ms or (rising and self._queue_ms > 0.5 * self.delay_threshold_ms):
                overuse, factor = True, min(factor, 0.85)
        if buffered_bytes is not None and buffered_bytes * 8 > self.buffered_threshold_s * eff:
            overuse, factor = True, min(factor, 0.85)
        self.congested = overuse
        if overuse:
            if self._last_decrease is None or now - self._last_decrease >= self.decrease_interval_s:
                # once per interval: several reports of one congestion episode must not compound
                self._cap_bps = max(self.min_bps, eff * factor)
                self._last_decrease = now
        elif loss <= _LOSS_HOLD and self._cap_bps is not None and self._last_feedback_t is not None:
            recently_cut = self._last_decrease is not None and now - self._last_decrease < 1.0
            if not recently_cut:
                dt = min(max(now - self._last_feedback_t, 0.0), 1.0)
                self._cap_bps *= self.recovery_per_s ** dt
                if self._cap_bps >= self._target_bps:
                    self._cap_bps = None
        self._last_feedback_t = now
        self._clamp_buffer()
        return self.effective_target_kbps
