"""The call's sound: audio sources as aiortc tracks (Opus, aiortc's own codec) and the receiving
end's sink (counts, lip-sync measurement, --record, --play).

Sources (`--audio SPEC`, `open_audio`), 48 kHz mono, 20 ms frames:

* ``auto``: the video source's own sound if it has one (a file, the sample clip), else the
  microphone, else silence, with one line saying why;
* ``mic[:DEVICE]``: a microphone through PyAV (pulse or alsa on Linux, avfoundation on macOS,
  dshow on Windows); none there is one line and the call goes on silent;
* ``sample`` / ``PATH``: the sound track of the bundled clip / of a file. With the same file as
  the video source it follows the video's clock (`FileSource.clip`): the video is paced at
  --fps, not at the file's rate, so the sound plays at the video's speed and both loop together;
* ``tone``: a 100 ms chirp at the start of every second of the capture clock (the marker of
  `sources.marked`; `--source synthetic:flash` or `sample:flash` whitens a corner then);
* ``none``: silence.

`PushedAudioSource` takes samples from elsewhere (the browser page's microphone): bounded to
PUSH_BUFFER_MS (the oldest are dropped), silence when nothing came.

Each call gets a fresh track (`AudioSource.track()`): aiortc stops a track when its peer
connection closes. A track paces itself: frame n (content of the capture instants
[t0 + n·20 ms, t0 + (n+1)·20 ms)) is handed over when its last sample has been "captured", as
a microphone's buffer would be.

The receiving end (`AudioSink`) gives every received sample a play time on this machine's clock:
the frame's RTP time plus the largest (arrival - RTP time) of the last second, so playback is
contiguous and follows the path's delay. --record writes the samples at their play time and the
pictures at their shown time (one clock: the file is what was heard and seen); --play hands
them to an output device.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .errors import ConfigError
from .sources import MARK_S, BrowserSource, FileSource, FrameSource, flash_shown, marked, now_us
from .stats import percentile
from .video import SAMPLE_CLIP

if TYPE_CHECKING:
    from .record import Recorder

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms, Opus's usual frame
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
AUDIO_SPECS = ("auto", "mic", "sample", "tone", "none")
PUSH_BUFFER_MS = 200
MAX_BEHIND_S = 0.5  # a track this late (a stalled loop) skips ahead instead of bursting
MAX_FILE_AUDIO_S = 600  # a file's sound is held in memory (48 kHz mono int16: 58 MB for 10 min)
CHIRP_HZ = (500.0, 3000.0)  # the tone's sweep: a sharp correlation peak, unlike a pure tone
TONE_LEVEL = 0.5


def say(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _no_c_stderr() -> Any:
    """ALSA's C library prints its own lines on a missing device: keep them out of the one line
    we print (fd 2 is pointed at /dev/null for the device's open only)."""
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    sys.stderr.flush()
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Any decoded frame -> int16 mono samples (channels averaged)."""
    if frame.format.name != "s16" or frame.format.is_planar:
        frame = av.AudioResampler(format="s16", layout=frame.layout.name, rate=frame.sample_rate).resample(frame)[0]
    channels = len(frame.layout.channels)
    x = frame.to_ndarray().reshape(-1, channels)
    return x[:, 0].copy() if channels == 1 else x.astype(np.int32).mean(axis=1).astype(np.int16)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """int16 mono at `rate` -> 48 kHz (linear: enough for a call's voice)."""
    if rate == SAMPLE_RATE or len(samples) == 0:
        return samples.astype(np.int16, copy=False)
    n = int(round(len(samples) * SAMPLE_RATE / rate))
    x = np.interp(np.arange(n) * (rate / SAMPLE_RATE), np.arange(len(samples)), samples.astype(np.float32))
    return x.astype(np.int16)


# -- sources -------------------------------------------------------------------------------

class AudioSource:
    """Sound as a function of the capture clock: `render(t_us, n)` gives the n samples of the
    instants from t_us on. Subclasses: tone, silence, file, pushed (and the microphone)."""

    name = "none"
    muted = False  # the page's "mute microphone": the track sends silence meanwhile

    def render(self, t_us: int, n: int) -> np.ndarray:
        return np.zeros(n, np.int16)

    def track(self) -> "AudioTrack":
        """A new aiortc track for one call (each peer connection stops its own at the end)."""
        return AudioTrack(self)

    def close(self) -> None:
        pass


class ToneSource(AudioSource):
    """A chirp of MARK_S at the start of every second of the capture clock, silence between."""

    name = "tone"

    def render(self, t_us: int, n: int) -> np.ndarray:
        return tone(t_us, n)


def tone(t_us: int, n: int) -> np.ndarray:
    """The `tone` source's samples from capture instant t_us on (tests compare with it)."""
    tau = ((t_us % 1_000_000) / 1e6 + np.arange(n) / SAMPLE_RATE) % 1.0
    f0, f1 = CHIRP_HZ
    k = (f1 - f0) / MARK_S
    x = np.sin(2 * np.pi * (f0 * tau + 0.5 * k * tau * tau)) * (tau < MARK_S)
    return (x * TONE_LEVEL * 32767).astype(np.int16)


class FileAudioSource(AudioSource):
    """A file's sound track. With `video` (a FileSource of the same file) it follows the
    video's clip clock: the position of frame time c read at t_v is c + (t - t_v)·speed, speed =
    --fps / the file's frame rate; a drift over 60 ms (or the clip starting again) jumps."""

    def __init__(self, path: str | Path, video: FileSource | None = None, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or f"file:{self.path.name}"
        self.video = video
        self.start_s, self.samples = self._decode()
        self._pos: float | None = None  # seconds in the file of the next sample
        self._t0: int | None = None

    def _decode(self) -> tuple[float, np.ndarray]:
        try:
            with av.open(str(self.path)) as c:
                if not c.streams.audio:
                    raise ConfigError(f"--audio {self.path}: the file has no sound track")
                out = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
                start, chunks, total = None, [], 0
                for frame in c.decode(audio=0):
                    if start is None:
                        start = float(frame.time or 0.0)
                    for f in out.resample(frame):
                        chunks.append(f.to_ndarray().reshape(-1))
                        total += f.samples
                    if total > MAX_FILE_AUDIO_S * SAMPLE_RATE:
                        say(f"audio: {self.path.name}: only the first {MAX_FILE_AUDIO_S} s of sound are played")
                        break
        except (av.error.FFmpegError, OSError) as e:
            raise ConfigError(f"--audio {self.path}: cannot read its sound: {e}") from None
        if not chunks:
            raise ConfigError(f"--audio {self.path}: the sound track has no decodable samples")
        return start or 0.0, np.concatenate(chunks).astype(np.int16)

    def _position(self, t_us: int) -> float:
        """Where in the file (seconds) capture instant t_us is."""
        clip = self.video.clip if self.video is not None else None
        if clip is None:  # no video clock (yet): our own, looping over the sound's length
            if self._t0 is None:
                self._t0 = t_us
            length = len(self.samples) / SAMPLE_RATE
            return self.start_s + ((t_us - self._t0) / 1e6) % length
        c, t_v = clip
        return c + (t_us - t_v) / 1e6 * self._speed()

    def _speed(self) -> float:
        v = self.video
        return v.fps / v.file_rate if v is not None and v.file_rate > 0 else 1.0

    def render(self, t_us: int, n: int) -> np.ndarray:
        target = self._position(t_us)
        if self._pos is None or abs(self._pos - target) > 0.06:
            self._pos = target
        step = self._speed() / SAMPLE_RATE
        idx = (self._pos - self.start_s) * SAMPLE_RATE + np.arange(n) * step * SAMPLE_RATE
        self._pos += n * step
        inside = (idx >= 0) & (idx < len(self.samples) - 1)  # past the sound's end: silence
        out = np.zeros(n, np.float32)
        if inside.any():
            out[inside] = np.interp(idx[inside], np.arange(len(self.samples)), self.samples.astype(np.float32))
        return out.astype(np.int16)


class PushedAudioSource(AudioSource):
    """Samples pushed from elsewhere (the page's microphone): `push(int16 mono, rate)` from the
    event loop or any thread; at most PUSH_BUFFER_MS wait (the oldest are dropped), and a frame
    with nothing pushed is silence (padded)."""

    name = "pushed"

    def __init__(self, max_ms: int = PUSH_BUFFER_MS) -> None:
        self.max_samples = max_ms * SAMPLE_RATE // 1000
        self._buf = np.zeros(0, np.int16)
        self._lock = threading.Lock()
        self.pushed = 0  # samples, at 48 kHz
        self.dropped = 0  # samples dropped as the oldest beyond the bound
        self.underrun = 0  # samples of silence where nothing had been pushed

    def push(self, samples: np.ndarray, sample_rate: int) -> None:
        x = np.asarray(samples)
        if x.ndim != 1 or not 8000 <= int(sample_rate) <= 192000:
            raise ValueError(f"push wants int16 mono samples at 8-192 kHz, got shape {x.shape} at {sample_rate}")
        x = resample(x.astype(np.int16, copy=False), int(sample_rate))
        with self._lock:
            self._buf = np.concatenate([self._buf, x])
            self.pushed += len(x)
            extra = len(self._buf) - self.max_samples
            if extra > 0:
                self._buf = self._buf[extra:]
                self.dropped += extra

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def render(self, t_us: int, n: int) -> np.ndarray:
        with self._lock:
            out, self._buf = self._buf[:n], self._buf[n:]
        if len(out) < n:
            self.underrun += n - len(out)
            out = np.concatenate([out, np.zeros(n - len(out), np.int16)])
        return out


def default_mic() -> tuple[str, list[str]]:
    """(device, PyAV input formats to try) of the platform's default microphone."""
    if sys.platform.startswith("linux"):
        return "default", ["pulse", "alsa"]
    if sys.platform == "darwin":
        return ":0", ["avfoundation"]
    if sys.platform.startswith("win"):
        return "audio=Microphone", ["dshow"]
    return "default", []


class MicSource(PushedAudioSource):
    """A microphone through PyAV: a thread reads the device and pushes what it captures. The
    device keeps its own clock: the bound absorbs the drift against ours."""

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        dev, formats = default_mic()
        dev = device or dev
        if sys.platform.startswith("win") and not dev.startswith("audio="):
            dev = f"audio={dev}"
        if sys.platform == "darwin" and not dev.startswith(":"):
            dev = f":{dev}"
        self.name = f"mic:{dev}"
        self._container = None
        problems = []
        for fmt in formats:
            if fmt not in av.formats_available:
                problems.append(f"{fmt}: not in this FFmpeg build")
                continue
            try:
                with _no_c_stderr():
                    self._container = av.open(dev, format=fmt)
                break
            except (av.error.FFmpegError, OSError) as e:
                problems.append(f"{fmt}: {getattr(e, 'strerror', None) or e}")
        if self._container is None:
            raise OSError(f"no microphone at {dev} ({'; '.join(problems) or 'no audio input on ' + sys.platform})")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for frame in self._container.decode(audio=0):
                if self._stop.is_set():
                    break
                self.push(to_mono(frame), frame.sample_rate)
        except Exception as e:  # noqa: BLE001 - a device unplugged: say it, the call goes on silent
            if not self._stop.is_set():
                say(f"audio: the microphone stopped ({e}); the call goes on silent")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._container.close()


class AudioTrack(MediaStreamTrack):
    """One call's audio track: 20 ms frames of `source`, paced by the capture clock."""

    kind = "audio"

    def __init__(self, source: AudioSource) -> None:
        super().__init__()
        self.source = source
        self._n = 0  # samples handed over
        self._mono0: float | None = None
        self._epoch0 = 0
        self.frames = 0

    @property
    def epoch0(self) -> int | None:
        """The capture instant (µs, epoch) of sample 0 (the RTP clock's 0), once started."""
        return self._epoch0 if self._mono0 is not None else None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._mono0 is None:
            self._mono0, self._epoch0 = now, now_us()
        due = self._mono0 + (self._n + FRAME_SAMPLES) / SAMPLE_RATE
        if now - due > MAX_BEHIND_S:  # skip ahead: the frames of the stall are never sent
            self._n = int((now - self._mono0) * SAMPLE_RATE) - FRAME_SAMPLES
            due = now
        if due > now:
            await asyncio.sleep(due - now)
        samples = self.source.render(self._epoch0 + self._n * 1_000_000 // SAMPLE_RATE, FRAME_SAMPLES)
        if self.source.muted:
            samples = np.zeros_like(samples)  # (rendered all the same: a file's clock goes on)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._n
        frame.time_base = TIME_BASE
        self._n += FRAME_SAMPLES
        self.frames += 1
        return frame


def check_audio_spec(spec: str) -> None:
    """--audio's spelling, before anything loads (ConfigError: one line)."""
    if spec in AUDIO_SPECS or spec.startswith("mic:"):
        return
    if not Path(spec).expanduser().is_file():
        raise ConfigError(f"--audio {spec!r}: use auto, mic[:DEVICE], sample, tone, none or the path of a "
                          "file with sound" + (" (no such file)" if ("/" in spec or "." in spec) else ""))


def open_audio(spec: str, video_source: FrameSource | None = None, quiet: bool = False) -> AudioSource:
    """The source for --audio SPEC. A missing microphone is one line and silence; a bad spec
    or a file without sound is a ConfigError."""
    check_audio_spec(spec)
    video = video_source if isinstance(video_source, FileSource) else None
    if spec == "none":
        return AudioSource()
    if spec == "tone":
        return ToneSource()
    if spec == "sample":
        same = video if video is not None and video.path.resolve() == SAMPLE_CLIP.resolve() else None
        return FileAudioSource(SAMPLE_CLIP, same, name="sample")
    if spec == "mic" or spec.startswith("mic:"):
        return _mic_or_silence(spec.partition(":")[2] or None, False, "")  # asked for: said even --quiet
    if spec == "auto":
        if isinstance(video_source, BrowserSource):  # the page's microphone comes with its camera
            src = PushedAudioSource()
            src.name = "browser"
            return src
        if video is not None and video.has_audio:
            return FileAudioSource(video.path, video, name="sample" if video.name.startswith("sample") else None)
        why = f" ({video.name} has no sound)" if video is not None else ""
        return _mic_or_silence(None, quiet, why)
    path = Path(spec).expanduser()
    same = video if video is not None and video.path.resolve() == path.resolve() else None
    return FileAudioSource(path, same)


def _mic_or_silence(device: str | None, quiet: bool, why: str) -> AudioSource:
    try:
        return MicSource(device)
    except OSError as e:
        say(f"audio: {e}{why}: the call goes on without sound (--audio tone|sample|PATH|none)", quiet)
        return AudioSource()


# -- the receiving end ---------------------------------------------------------------------

class AVSync:
    """Lip-sync from a `tone` + `synthetic:flash` (or `sample:flash`) sender: each beep's onset
    as played vs the first picture with the flash of the same second as shown (this machine's
    clock). offset =
    shown - played: positive when the sound is early (ITU-R BT.1359 tolerates about +45 ms
    early to -125 ms late)."""

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
            with _no_c_stderr():
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


__all__ = ["AUDIO_SPECS", "AudioSource", "ToneSource", "FileAudioSource", "PushedAudioSource", "MicSource",
           "AudioTrack", "AudioSink", "AVSync", "Player", "open_audio", "open_player", "check_audio_spec", "tone",
           "marked", "SAMPLE_RATE", "FRAME_SAMPLES"]
