"""The receiving end of the call's sound (streamer/audio.py sends it): `AudioSink` consumes the
other end's aiortc audio track, counts it, gives every sample a play time on this machine's
clock (the frame's RTP time plus the largest (arrival - RTP time) of the last second, so
playback is contiguous and follows the path's delay), aligns it with the pictures, records it
(--record: the samples at their play time, the pictures at their shown time, one clock) and
plays it (--play); `AVSync` measures lip-sync from a tone + flash sender.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio import FRAME_SAMPLES, SAMPLE_RATE, TIME_BASE, no_c_stderr, resample, say, to_mono
from .sources import flash_shown, now_us
from .stats import percentile

if TYPE_CHECKING:
    from .record import Recorder


class AVSync:
    """Lip-sync from a `tone` + `synthetic:flash` (or `sample:flash`) sender: each beep's onset
    as played vs the first picture with the flash of the same second as shown (this machine's
    clock). offset = shown - played: positive when the sound is early (ITU-R BT.1359 tolerates
    about +45 ms early to -125 ms late)."""

    def __init__(self) -> None:
        self.flashes: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)  # (shown, capture)
        self.beeps: collections.deque[int] = collections.deque(maxlen=4096)
        self._bright = False

    def video(self, shown_us: int, capture_us: int, image: np.ndarray) -> None:
        bright = flash_shown(image)
        if bright and not self._bright:
            self.flashes.append((shown_us, capture_us))
        self._bright = bright

    def audio_onset(self, played_us: int) -> None:
        self.beeps.append(played_us)

    def pairs(self) -> list[tuple[int, int, int]]:
        """(beep played, flash shown, flash captured) of the same marker: the nearest within 0.5 s."""
        out = []
        flashes = list(self.flashes)
        for b in self.beeps:
            near = min(flashes, key=lambda f: abs(f[0] - b), default=None)
            if near is not None and abs(near[0] - b) < 500_000:
                out.append((b, *near))
        return out

    def summary(self) -> dict[str, Any]:
        """av_offset_ms: shown - played as a viewer meets them; path_offset_ms: the same less
        the flash picture's capture phase (its capture instant after the marker's start, up to
        one frame period: the source's frame rate, not the call)."""
        pairs = self.pairs()
        off = [(s - b) / 1000 for b, s, _ in pairs]
        path = [(s - b - c % 1_000_000) / 1000 for b, s, c in pairs]

        def pct(v: list[float]) -> dict[str, float | None]:
            return {k: (round(percentile(v, q), 1) if v else None) for k, q in (("p5", 5), ("p50", 50), ("p95", 95))}
        return {"pairs": len(pairs), "beeps": len(self.beeps), "flashes": len(self.flashes),
                "av_offset_ms": pct(off), "path_offset_ms": pct(path),
                # after the second's start (the marker): each path's delay, on one machine's clock
                "audio_after_marker_ms": pct([(b % 1_000_000) / 1000 for b, _, _ in pairs]),
                "video_after_marker_ms": pct([(s % 1_000_000) / 1000 for _, s, _ in pairs]),
                "within_bt1359": sum(1 for o in off if -125 <= o <= 45)}


class AudioSink:
    """Consumes the other end's audio track: counts frames, gives samples their play time,
    finds beep onsets (with `av_sync`), records (`recorder.write_audio`) and plays (`player`).

    `delay_ms` plays the sound that much later; "auto" aligns it with the pictures: aiortc's
    audio path (20 ms frames, a 4-frame jitter buffer) takes ~120 ms, the pictures' anything
    from ~60 ms (one way, idle) to 200+ ms (a loaded two-way call). The sender tells its audio
    clock (meta "at0": the capture instant of its sample 0, which is our RTP time 0), so the
    sound's delay is known as the pictures' is (on the same two clocks); sound that would come
    before its pictures is delayed to AIM_LATE_MS after them (the median of the last pictures,
    slewed by at most 1 ms per frame, moved only when off by over ALIGN_SLACK_MS). BT.1359's
    window (45 ms early to 125 ms late) is centred 40 ms late: aiming a little late keeps the
    pictures' jitter inside it. Late sound is left: the pictures are never held back."""

    LOUD = 0.1 * 32767  # a beep's onset: the first sample this loud after QUIET_S of quiet
    QUIET_S = 0.3
    ALIGN_SLACK_MS = 10
    AIM_LATE_MS = 30
    MAX_ALIGN_MS = 500

    def __init__(self, recorder: "Recorder | None" = None, player: "Player | None" = None,
                 av_sync: AVSync | None = None, delay_ms: "float | str" = 0.0) -> None:
        self.recorder, self.player, self.av_sync = recorder, player, av_sync
        self.auto = delay_ms == "auto"
        self.delay_us = 0 if self.auto else int(float(delay_ms) * 1000)
        self.frames = 0
        self.samples = 0
        self.sender_t0: int | None = None  # the sender's audio clock (meta "at0")
        self.audio_delay_ms: float | None = None  # capture -> play of the last frame (with sender_t0)
        self._video: collections.deque[float] = collections.deque(maxlen=30)  # pictures' delay, ms
        self._tasks: list[asyncio.Task[None]] = []
        self._last_loud = 0
        self._player_next: int | None = None
        # tests: (samples, play µs, RTP µs: the sender's clock, contiguous but for losses)
        self.on_samples: Callable[[np.ndarray, int, int], None] | None = None

    @property
    def ms(self) -> float:
        return self.samples * 1000 / SAMPLE_RATE

    def video_latency(self, ms: float) -> None:
        """A shown picture's capture -> display delay (the receiver's)."""
        self._video.append(ms)

    def _align(self, natural_us: int, rtp_us: int) -> None:
        """--audio-delay-ms auto: move delay_us towards (pictures' delay - sound's delay)."""
        if self.sender_t0 is None or len(self._video) < 5:
            return
        sound_ms = (natural_us - self.sender_t0 - rtp_us) / 1000
        if not 0 <= sound_ms < 5000:  # a clock from another call, or none yet
            return
        want = min(self.MAX_ALIGN_MS, max(0.0, float(np.median(self._video)) + self.AIM_LATE_MS - sound_ms)) * 1000
        gap = want - self.delay_us
        if abs(gap) > self.ALIGN_SLACK_MS * 1000:
            self.delay_us += int(max(-1000, min(1000, gap)))

    def consume(self, track: MediaStreamTrack) -> None:
        """Read `track` until it ends (its peer connection closed)."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.ensure_future(self._run(track)))

    async def _run(self, track: MediaStreamTrack) -> None:
        window: collections.deque[tuple[int, int]] = collections.deque()  # (frame, arrival - rtp) µs, max first
        n = 0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrived = now_us()
            rtp_us = int(frame.pts * frame.time_base * 1_000_000) if frame.pts is not None else n * 20_000
            # the play-out offset: the largest (arrival - rtp) of the last second (sliding max)
            d = arrived - rtp_us
            while window and window[-1][1] <= d:
                window.pop()
            window.append((n, d))
            while window[0][0] <= n - 50:
                window.popleft()
            n += 1
            natural = rtp_us + window[0][1]
            if self.auto:
                self._align(natural, rtp_us)
            if self.sender_t0 is not None:
                self.audio_delay_ms = (natural + self.delay_us - self.sender_t0 - rtp_us) / 1000
            self.take(to_mono(frame) if frame.sample_rate == SAMPLE_RATE else
                      resample(to_mono(frame), frame.sample_rate), natural + self.delay_us, rtp_us)

    def take(self, samples: np.ndarray, play_us: int, rtp_us: int = 0) -> None:
        """One frame's samples, to be played from `play_us` on."""
        self.frames += 1
        self.samples += len(samples)
        if self.av_sync is not None:
            loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > self.LOUD)
            if len(loud):
                t = play_us + int(loud[0]) * 1_000_000 // SAMPLE_RATE
                if t - self._last_loud > self.QUIET_S * 1e6:
                    self.av_sync.audio_onset(t)
                self._last_loud = play_us + int(loud[-1]) * 1_000_000 // SAMPLE_RATE
        if self.recorder is not None:
            self.recorder.write_audio(samples, play_us)
        if self.player is not None:
            self.player.write(self._for_player(samples, play_us))
        if self.on_samples is not None:
            self.on_samples(samples, play_us, rtp_us)

    def _for_player(self, samples: np.ndarray, play_us: int) -> np.ndarray:
        """A device plays what it gets back to back: a later play time is silence first, an
        earlier one drops what overlaps (bounded to 200 ms)."""
        nxt, self._player_next = self._player_next, play_us + len(samples) * 1_000_000 // SAMPLE_RATE
        if nxt is None:
            return samples
        shift = (play_us - nxt) * SAMPLE_RATE // 1_000_000
        if shift > FRAME_SAMPLES // 2:
            return np.concatenate([np.zeros(min(shift, SAMPLE_RATE // 5), np.int16), samples])
        if shift < -FRAME_SAMPLES // 2:
            return samples[min(len(samples), -shift):]
        return samples

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.player is not None:
            self.player.close()


class Player:
    """--play: the received sound to this machine's output device (PyAV: alsa/pulse on Linux,
    audiotoolbox on macOS); a thread writes from a short queue. `open_player` says in one line
    when there is no output device and the call goes on without playing."""

    def __init__(self, container: Any, stream: Any) -> None:
        self._container, self._stream = container, stream
        self._q: collections.deque[np.ndarray] = collections.deque(maxlen=25)  # 0.5 s
        self._have = threading.Event()
        self._stop = threading.Event()
        self.error: str | None = None
        self._pts = 0
        self._thread = threading.Thread(target=self._run, name="play", daemon=True)
        self._thread.start()

    def write(self, samples: np.ndarray) -> None:
        if self.error is None:
            self._q.append(samples)
            self._have.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._have.wait(0.2):
                continue
            self._have.clear()
            while self._q:
                try:
                    self._play(self._q.popleft())
                except Exception as e:  # noqa: BLE001 - the device went away: the call goes on
                    self.error = f"playing the sound failed: {e}"
                    say(f"audio: {self.error}; the call goes on without playing")
                    return

    def _play(self, samples: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, self._pts, TIME_BASE
        self._pts += len(samples)
        for p in self._stream.encode(frame):
            self._container.mux(p)

    def close(self) -> None:
        self._stop.set()
        self._have.set()
        self._thread.join(timeout=1.0)
        with contextlib.suppress(Exception):
            self._container.close()


def open_player(prog: str, quiet: bool = False) -> Player | None:
    """An output device for --play, or None with one line saying why not."""
    if sys.platform.startswith("linux"):
        candidates = [("pulse", "default"), ("alsa", "default")]
    elif sys.platform == "darwin":
        candidates = [("audiotoolbox", "0")]
    else:
        candidates = []
    problems = []
    for fmt, dev in candidates:
        if fmt not in av.formats_available:
            problems.append(f"{fmt}: not in this FFmpeg build")
            continue
        try:
            with no_c_stderr():
                c = av.open(dev, mode="w", format=fmt)
                s = c.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
                silence = av.AudioFrame.from_ndarray(np.zeros((1, FRAME_SAMPLES), np.int16), format="s16",
                                                     layout="mono")
                silence.sample_rate, silence.pts, silence.time_base = SAMPLE_RATE, 0, TIME_BASE
                for p in s.encode(silence):  # the device really opens at the first write
                    c.mux(p)
            player = Player(c, s)
            player._pts = FRAME_SAMPLES
            return player
        except (av.error.FFmpegError, OSError, ValueError) as e:
            problems.append(f"{fmt}: {getattr(e, 'strerror', None) or e}")
    say(f"{prog}: --play is not supported here: no audio output device "
        f"({'; '.join(problems) or 'no PyAV output device on ' + sys.platform}); the call goes on without playing")
    return None


__all__ = ["AudioSink", "AVSync", "Player", "open_player"]
