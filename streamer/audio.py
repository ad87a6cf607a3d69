"""The call's sound, the sending side: audio sources as aiortc tracks (Opus, aiortc's own
codec). The receiving end (counts, lip-sync, --record, --play) is streamer/audio_sink.py.

Sources (`--audio SPEC`, `open_audio`), 48 kHz mono, 20 ms frames:

* ``auto``: the video source's own sound if it has one (a file, the sample clip), else the
  microphone, else silence, with one line saying why;
* ``mic[:DEVICE]``: a microphone through PyAV (pulse or alsa on Linux, avfoundation on macOS,
  dshow on Windows); none there is one line and the call goes on silent;
* ``sample`` / ``PATH``: the sound track of the bundled clip / of a file. With the same file as
  the video source it follows the video's clock (`FileSource.clip`): the file plays at its own
  speed whatever --fps captures it at, and sound and pictures loop together;
* ``tone``: a 100 ms chirp at the start of every second of the capture clock (the marker of
  `sources.marked`; `--source synthetic:flash` or `sample:flash` whitens a corner then);
* ``none``: silence.

`PushedAudioSource` takes samples from elsewhere (the browser page's microphone): bounded to
PUSH_BUFFER_MS (the oldest are dropped), silence when nothing came.

Each call gets a fresh track (`AudioSource.track()`): aiortc stops a track when its peer
connection closes. A track paces itself: frame n (content of the capture instants
[t0 + n·20 ms, t0 + (n+1)·20 ms)) is handed over when its last sample has been "captured", as
a microphone's buffer would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server.protocol import unpack_pcm

from .errors import ConfigError
from .sources import MARK_S, BrowserSource, FileSource, FrameSource, marked, now_us
from .video import SAMPLE_CLIP

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms, Opus's usual frame
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
AUDIO_SPECS = ("auto", "mic", "sample", "tone", "none")
PUSH_BUFFER_MS = 200
MAX_BEHIND_S = 0.5  # a track this late (a stalled loop) skips the stall's sound instead of bursting
MAX_FILE_AUDIO_S = 600  # a file's sound is held in memory (48 kHz mono int16: 58 MB for 10 min)
CHIRP_HZ = (500.0, 3000.0)  # the tone's sweep: a sharp correlation peak, unlike a pure tone
TONE_LEVEL = 0.5


def say(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def no_c_stderr() -> Any:
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
    video's clip clock: the position of clip time c captured at t_v is c + (t - t_v), the video
    playing at the file's own speed; a drift over 60 ms (or the clip starting again) jumps."""

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
        return c + (t_us - t_v) / 1e6

    def render(self, t_us: int, n: int) -> np.ndarray:
        target = self._position(t_us)
        if self._pos is None or abs(self._pos - target) > 0.06:
            self._pos = target
        idx = (self._pos - self.start_s) * SAMPLE_RATE + np.arange(n)
        self._pos += n / SAMPLE_RATE
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

    def push_pcm(self, payload: bytes) -> None:
        """A page's microphone chunk (docs/protocol.md, kind 4); ValueError if malformed."""
        rate, raw = unpack_pcm(payload)
        self.push(np.frombuffer(raw, "<i2"), rate)

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
                with no_c_stderr():
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
        if now - due > MAX_BEHIND_S:  # skip the stall's sound: the clock moves, the RTP time does not
            self._mono0 += now - due  # (so the receiver learns the new sample 0 from the next "at0")
            self._epoch0 += int((now - due) * 1_000_000)
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


def is_page_microphone(audio: AudioSource | None) -> bool:
    """Whether `audio` is fed by a page's microphone chunks (kind 4): pushed, and not a device
    of this machine (a MicSource pushes its own capture; page chunks must not mix into it)."""
    return isinstance(audio, PushedAudioSource) and not isinstance(audio, MicSource)


def _mic_or_silence(device: str | None, quiet: bool, why: str) -> AudioSource:
    try:
        return MicSource(device)
    except OSError as e:
        say(f"audio: {e}{why}: the call goes on without sound (--audio tone|sample|PATH|none)", quiet)
        return AudioSource()


__all__ = ["AUDIO_SPECS", "AudioSource", "ToneSource", "FileAudioSource", "PushedAudioSource", "MicSource",
           "is_page_microphone",
           "AudioTrack", "open_audio", "check_audio_spec", "tone", "marked", "to_mono", "resample", "SAMPLE_RATE",
           "FRAME_SAMPLES"]
