"""Recording the shown pictures to a file (`receive --record out.mp4`), off the event loop.

A writer thread takes frames from a short queue and encodes them with PyAV: H.264 (libx264,
`ultrafast`, so it does not steal the decoder's CPU) or MPEG-4 Part 2 where libx264 is absent.
Timestamps come from the sender's capture clock, so dropped or concealed-and-skipped frames keep
the recording's timing true, whatever the arrival times: the encoder counts in milliseconds
and every frame gets a later pts than the one before. A full queue drops the frame (counted)
instead of growing. A failed write (a full disk) stops the recording, not the call, and is
reported at once through `on_error`.
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


class Recorder:
    def __init__(self, path: str | Path, fps: float = 30.0, on_error: Callable[[str], None] | None = None) -> None:
        """`on_error(message)` is called once, from the writer thread, when recording fails."""
        self.path = Path(path)
        self.fps = fps
        self.on_error = on_error
        self.written = 0
        self.dropped = 0
        self.codec_name = ""
        self.error: str | None = None
        self._q: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue(QUEUE_FRAMES)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise ConfigError(f"cannot record to {self.path}: {e}") from None
        self._stream: av.VideoStream | None = None
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
            return
        raise ConfigError("no H.264 or MPEG-4 encoder in this FFmpeg build")

    def write(self, image: np.ndarray, timestamp_us: int, block: bool = False) -> None:
        """Queue one shown picture. A call never blocks (a lagging writer drops the frame);
        `block=True` waits for room instead (offline use, where every frame counts)."""
        if self.error is not None:
            return
        try:
            self._q.put((image, timestamp_us), block=block, timeout=10 if block else None)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                break
            image, ts = item
            try:
                self._encode(image, ts)
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
        pts = max((ts - self._t0) // 1000, self._last_pts + 1)  # strictly increasing
        self._last_pts = pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts
        frame.time_base = Fraction(1, 1000)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.written += 1

    def close(self) -> None:
        """Flush and close the file (blocks until the writer is done)."""
        if self._thread.is_alive():
            try:
                self._q.put(None, timeout=5)
            except queue.Full:  # the writer died with a full queue
                pass
        self._thread.join(timeout=30)
        try:
            if self._stream is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
            self._container.close()
        except Exception as e:  # noqa: BLE001
            self.error = self.error or f"closing {self.path} failed: {e}"
