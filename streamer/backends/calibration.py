"""Real frames for calibration and quality checks: the bundled sample clip, centre-cropped.

The int8 backends fix activation ranges from data, so they must see real faces, not noise:
the GRID clip shipped in streamer/assets (360x288, 75 frames) is always present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SourceError
from ..video import SAMPLE_CLIP, read_frames


def centre_square(frame: np.ndarray, side: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if h < side or w < side:
        raise SourceError(f"cannot crop {side}x{side} from a {w}x{h} frame")
    top, left = (h - side) // 2, (w - side) // 2
    return frame[top:top + side, left:left + side]


def sample_frames(size: int = 224, count: int | None = 16, path: str | Path = SAMPLE_CLIP) -> np.ndarray:
    """(count, size, size, 3) uint8 frames spread evenly over a clip (all frames if count is None),
    each centre-cropped to `size` (no scaling: the model sees the clip's own pixels)."""
    frames = [centre_square(f, size) for f in read_frames(path)]
    if not frames:
        raise SourceError(f"{path} holds no frames")
    if count is not None and count < len(frames):
        idx = np.linspace(0, len(frames) - 1, count).round().astype(int)
        frames = [frames[i] for i in idx]
    return np.ascontiguousarray(np.stack(frames))


def clip_set(paths: list[str | Path], size: int = 224, per_clip: int = 8) -> np.ndarray:
    """Frames from several clips (files, or folders of clips), each frame prepared as a call
    would prepare it (`sources.prepare`: centre crop, anti-alias downsample to `size`)."""
    from ..sources import prepare

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    out = []
    for f in files:
        frames = list(read_frames(f, max_frames=200))
        if not frames:
            continue
        idx = np.linspace(0, len(frames) - 1, min(per_clip, len(frames))).round().astype(int)
        out += [prepare(frames[i], size) for i in idx]
    if not out:
        raise SourceError(f"no frames in {', '.join(map(str, paths))}")
    return np.ascontiguousarray(np.stack(out))
