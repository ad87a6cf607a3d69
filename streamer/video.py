"""Reading and writing video files with PyAV, with errors a user can act on."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from .errors import SourceError

SAMPLE_CLIP = Path(__file__).resolve().parent / "assets" / "sample.mpg"


def read_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 (H, W, 3) frames of a video or image file, in order."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise SourceError(f"cannot open video {path}: {e}") from None
    with container:
        count = 0
        try:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
        except av.error.FFmpegError as e:
            if count == 0:
                raise SourceError(f"cannot decode video {path}: {e}") from None
            # a damaged tail: keep what decoded


def frame_rate(path: str | Path, default: float = 25.0) -> float:
    try:
        with av.open(str(path)) as c:
            rate = c.streams.video[0].average_rate
            return float(rate) if rate else default
    except (av.error.FFmpegError, OSError, IndexError):
        return default


class VideoWriter:
    """H.264 (or MPEG-4 Part 2 where libx264 is missing) writer for uint8 RGB frames."""

    def __init__(self, path: str | Path, fps: float, width: int, height: int, crf: int = 18) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        rate = Fraction(fps).limit_denominator(1000)
        try:
            self.stream = self.container.add_stream("libx264", rate=rate)
            self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        except (av.error.FFmpegError, ValueError):
            self.stream = self.container.add_stream("mpeg4", rate=rate)
            self.stream.bit_rate = 4_000_000
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"

    def write(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        if (w, h) != (self.stream.width, self.stream.height):  # yuv420p needs even sides
            frame = np.pad(frame, ((0, self.stream.height - h), (0, self.stream.width - w), (0, 0)), mode="edge")
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
