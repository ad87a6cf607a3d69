"""Recording the shown pictures and the played sound to one file (`receive --record out.mp4`),
off the event loop.

A writer thread takes frames from a short queue and encodes them with PyAV: H.264 (libx264,
`ultrafast`, so it does not steal the decoder's CPU) or MPEG-4 Part 2 where libx264 is absent;
with `audio=True` also the sound, AAC, 48 kHz mono. Timestamps are µs of one clock for both
streams (the call gives each picture its shown time and each sample its play time), relative to
the first item written, so the file is in step as the call was: skipped frames keep the timing
true, the encoder counts in milliseconds and every frame gets a later pts than the one before;
the sound is made contiguous (a gap is filled with silence, an overlap dropped). A full queue
drops the item (counted) instead of growing. A failed write (a full disk) stops the recording,
not the call, and is reported at once through `on_error`.
"""

from __future__ import annotations

import queue
import threading
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np

from .errors import ConfigError

QUEUE_FRAMES = 32  # ~1 s at 30 fps (4.8 MB at 224 px): rides out a busy CPU without dropping
QUEUE_AUDIO = 64  # 1.3 s of 20 ms frames
AUDIO_RATE = 48000
AAC_FRAME = 1024
AUDIO_SLACK = 480  # 10 ms: play-time jitter below this keeps the sound contiguous
MAX_GAP_S = 10.0  # a longer silence is not written out sample by sample
PENDING_AUDIO_S = 2.0  # sound that came before the first picture (the file's streams are made then)


class Recorder:
    def __init__(self, path: str | Path, fps: float = 30.0, on_error: Callable[[str], None] | None = None,
                 audio: bool = False) -> None:
        """`on_error(message)` is called once, from the writer thread, when recording fails;
        `audio`: the file gets a sound stream too (`write_audio`)."""
        self.path = Path(path)
        self.fps = fps
        self.on_error = on_error
        self.audio = audio
        self.written = 0
        self.dropped = 0
        self.audio_written = 0  # samples
        self.audio_dropped = 0  # frames
        self.codec_name = ""
        self.error: str | None = None
        self._q: queue.Queue[tuple[str, np.ndarray, int] | None] = queue.Queue(QUEUE_FRAMES + QUEUE_AUDIO)
        self._audio_in = self._audio_out = 0  # each counted by one thread only: in - out are queued
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise ConfigError(f"cannot record to {self.path}: {e}") from None
        self._stream: av.VideoStream | None = None
        self._astream: av.AudioStream | None = None
        self._resampler: av.AudioResampler | None = None
        self._pending: list[tuple[np.ndarray, int]] = []
        self._apts = 0  # the next sample's pts
        self._t0: int | None = None
        self._last_pts = -1
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def _open_stream(self, w: int, h: int) -> None:
        for name, opts in (("libx264", {"preset": "ultrafast", "crf": "20"}), ("mpeg4", {"qscale": "3"})):
            try:
                s = self._container.add_stream(name, rate=Fraction(self.fps).limit_denominator(1000))
            except (av.error.FFmpegError, ValueError):
                continue
            s.width, s.height, s.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
            # ms: capture timestamps give the pts. The encoder must count in ms too: left at
            # 1/fps, frames closer than one period round to the same pts and the muxer fails.
            s.time_base = Fraction(1, 1000)
            s.codec_context.time_base = Fraction(1, 1000)
            s.options = opts
            self._stream, self.codec_name = s, name
            self._open_audio()
            return
        raise ConfigError("no H.264 or MPEG-4 encoder in this FFmpeg build")

    def _open_audio(self) -> None:
        """The sound stream (before the first packet: the file's header lists every stream)."""
        if not self.audio or self._astream is not None:
            return
        a = self._container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        a.bit_rate = 64000
        a.time_base = Fraction(1, AUDIO_RATE)
        self._astream = a
        self._resampler = av.AudioResampler(format=a.codec_context.format.name, layout="mono", rate=AUDIO_RATE,
                                            frame_size=a.codec_context.frame_size or AAC_FRAME)
        self.codec_name += "+aac"
        pending, self._pending = self._pending, []
        for samples, ts in pending:
            self._encode_audio(samples, ts)

    def write(self, image: np.ndarray, timestamp_us: int, block: bool = False) -> None:
        """Queue one shown picture. A call never blocks (a lagging writer drops the frame);
        `block=True` waits for room instead (offline use, where every frame counts)."""
        if self.error is not None:
            return
        try:
            self._q.put(("v", image, timestamp_us), block=block, timeout=10 if block else None)
        except queue.Full:
            self.dropped += 1

    def write_audio(self, samples: np.ndarray, timestamp_us: int, block: bool = False) -> None:
        """Queue sound (int16 mono, 48 kHz) to be heard from `timestamp_us` on (the pictures'
        clock). Never blocks a call: a lagging writer drops the frame."""
        if self.error is not None or not self.audio:
            return
        if not block and self._audio_in - self._audio_out >= QUEUE_AUDIO:
            self.audio_dropped += 1  # (the pictures keep their share of the queue)
            return
        try:
            self._q.put(("a", samples, timestamp_us), block=block, timeout=10 if block else None)
            self._audio_in += 1
        except queue.Full:
            self.audio_dropped += 1

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                break
            kind, data, ts = item
            try:
                if kind == "v":
                    self._encode(data, ts)
                else:
                    self._audio_out += 1
                    self._encode_audio(data, ts)
            except Exception as e:  # noqa: BLE001 - a full disk must not end the call
                self.error = f"recording to {self.path} failed: {e}"
                if self.on_error is not None:
                    self.on_error(self.error)
                break

    def _encode(self, image: np.ndarray, ts: int) -> None:
        h, w = image.shape[:2]
        if self._stream is None:
            self._open_stream(w, h)
        assert self._stream is not None
        if (w, h) != (self._stream.width, self._stream.height):
            image = np.pad(image, ((0, self._stream.height - h), (0, self._stream.width - w), (0, 0)), mode="edge")
        if self._t0 is None:
            self._t0 = ts
        pts = max((ts - self._t0) // 1000, self._last_pts + 1, 0)  # strictly increasing
        self._last_pts = pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts
        frame.time_base = Fraction(1, 1000)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.written += 1

    def _encode_audio(self, samples: np.ndarray, ts: int) -> None:
        if self._t0 is None:
            self._t0 = ts
        if self._astream is None:  # no picture yet: wait for it, the newest PENDING_AUDIO_S only
            self._pending.append((samples, ts))
            while len(self._pending) * len(samples) > PENDING_AUDIO_S * AUDIO_RATE:
                self._pending.pop(0)
            return
        at = (ts - self._t0) * AUDIO_RATE // 1_000_000  # where these samples belong
        if at > self._apts + AUDIO_SLACK:  # a gap (a lost or late stretch): silence, bounded
            gap = min(at - self._apts, int(MAX_GAP_S * AUDIO_RATE))
            self._apts = at - gap
            samples = np.concatenate([np.zeros(gap, np.int16), samples])
        elif at < self._apts - AUDIO_SLACK:  # an overlap: the part already written is dropped
            samples = samples[min(len(samples), self._apts - at):]
        if len(samples) == 0:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, self._apts, Fraction(1, AUDIO_RATE)
        self._apts += len(samples)
        assert self._resampler is not None and self._astream is not None
        for f in self._resampler.resample(frame):
            for packet in self._astream.encode(f):
                self._container.mux(packet)
        self.audio_written += len(samples)

    def close(self) -> None:
        """Flush and close the file (blocks until the writer is done)."""
        if self._thread.is_alive():
            try:
                self._q.put(None, timeout=5)
            except queue.Full:  # the writer died with a full queue
                pass
        self._thread.join(timeout=30)
        try:
            if self._stream is None and self._pending:  # sound and no picture: a sound-only file
                self._open_audio()
            if self._stream is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
            if self._astream is not None:
                for packet in self._astream.encode():
                    self._container.mux(packet)
            self._container.close()
        except Exception as e:  # noqa: BLE001
            self.error = self.error or f"closing {self.path} failed: {e}"
