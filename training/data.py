"""Training data: frames sampled from folders of videos and images (or VoxCeleb2), cached as uint8.

Every source (a video or an image) becomes one cached array `(N, S, S, 3)` uint8 in the cache
directory: frames sampled in time (the first, then one every `every_s` seconds), brought to the
model's framing the way the call does it (`streamer.antialias`: centre square of side S*k, Gaussian
anti-alias downsampling by 1/k), and stored at side S (`cache_size`, e.g. 256) so that random
128/224 crops are cheap and epochs never decode video again.

Layouts:
- any folder: every video/image file under it, recursively (`folder_sources`);
- VoxCeleb2: `dev|test/<identity>/<video>/<utterance>.mp4` (`voxceleb_sources`), with an
  identity-disjoint train/val split (`split_identities`).

Unreadable or corrupt files are reported (warnings + `FrameCache.skipped`) and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger("training.data")

VIDEO_SUFFIXES = {".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".264", ".h264", ".y4m"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
RAW_STREAM_FPS = 25.0  # raw Annex-B streams carry no timing: assume 25 fps (see the data README)
CACHE_VERSION = 1


# -- which files ---------------------------------------------------------------------------------

def is_video(p: Path) -> bool:
    return p.suffix.lower() in VIDEO_SUFFIXES


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def folder_sources(root: str | Path) -> list[Path]:
    """Every video and image file under `root`, recursively, in a stable order."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no data folder at {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and (is_video(p) or is_image(p)))


def voxceleb_identity(path: Path) -> str:
    """`.../<partition>/<identity>/<video>/<utterance>.mp4` -> identity (e.g. id00012)."""
    return path.parent.parent.name


def voxceleb_sources(root: str | Path, partition: str = "dev") -> list[Path]:
    """Utterances of one VoxCeleb2 partition (`dev` or `test`) under `root`."""
    base = Path(root) / partition
    if not base.is_dir():
        raise FileNotFoundError(f"no VoxCeleb2 partition at {base} (expected {partition}/<id>/<video>/<utt>.mp4)")
    return sorted(p for p in base.glob("*/*/*") if p.is_file() and is_video(p))


def split_identities(paths: Sequence[Path], val_fraction: float = 0.1, seed: int = 0,
                     identity=voxceleb_identity) -> tuple[list[Path], list[Path]]:
    """(train, val) with no identity in both: identities, not files, are drawn for val."""
    ids = sorted({identity(p) for p in paths})
    rng = random.Random(seed)
    rng.shuffle(ids)
    n_val = max(1, round(len(ids) * val_fraction)) if len(ids) > 1 and val_fraction > 0 else 0
    val_ids = set(ids[:n_val])
    train = [p for p in paths if identity(p) not in val_ids]
    val = [p for p in paths if identity(p) in val_ids]
    return train, val


def sample_utterances(paths: Sequence[Path], n: int | None, seed: int = 0) -> list[Path]:
    """The seed's compilation: `n` utterances drawn at random (all when n is None)."""
    if n is None or n >= len(paths):
        return list(paths)
    return sorted(random.Random(seed).sample(list(paths), n))


# -- decoding ------------------------------------------------------------------------------------

def sampled_video_frames(path: str | Path, every_s: float, max_frames: int | None = None,
                         max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 frames of a video: the first, then the first frame at or after each multiple of
    `every_s` seconds (the seed's sampling). Timing falls back to frame index / fps when the
    stream has no timestamps (raw .264)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate) if stream.average_rate else RAW_STREAM_FPS
        if Path(path).suffix.lower() in (".264", ".h264"):
            fps = RAW_STREAM_FPS
        next_t, count = 0.0, 0
        for i, frame in enumerate(container.decode(stream)):
            t = float(frame.pts * stream.time_base) if frame.pts is not None and stream.time_base else i / fps
            if i == 0:
                t0 = t
            t -= t0
            if max_seconds is not None and t > max_seconds:
                break
            if t + 1e-6 >= next_t:
                yield frame.to_ndarray(format="rgb24")
                count += 1
                if max_frames is not None and count >= max_frames:
                    break
                next_t = (math.floor((t + 1e-6) / every_s) + 1) * every_s if every_s > 0 else 0.0


def evenly_spaced_video_frames(path: str | Path, n: int) -> list[np.ndarray]:
    """`n` frames spread evenly over a whole clip (decodes it once; for short val clips)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError("no frames decoded")
    idx = np.unique(np.linspace(0, len(frames) - 1, num=min(n, len(frames))).round().astype(int))
    return [frames[i] for i in idx]


def read_image(path: str | Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def frame_to_square(frame: np.ndarray, size: int) -> np.ndarray:
    """The call's framing: centre square of side size*k, anti-alias downsampled by 1/k to `size`.
    A frame smaller than `size` keeps its largest centre square at native resolution (a multiple
    of 8), never upsampled."""
    from streamer.antialias import centre_crop, crop_side_for, downsample_frame

    h, w = frame.shape[:2]
    if min(h, w) < size:
        side = min(h, w) // 8 * 8
        return np.ascontiguousarray(centre_crop(frame, side))
    side, k = crop_side_for(size, h, w)
    square = centre_crop(frame, side)
    out = square if k == 1 else downsample_frame(square, 1.0 / k)
    if out.shape[0] != size or out.shape[1] != size:  # rounding in the resampler: trim to size
        out = centre_crop(out, size)
    return np.ascontiguousarray(out, dtype=np.uint8)


# -- the cache -----------------------------------------------------------------------------------

@dataclass
class FrameCache:
    """Sampled, framed frames of many sources, one `.npy` per source in `cache_dir`."""

    sources: list[Path]
    size: int = 256  # side of the cached squares
    every_s: float = 0.25  # one frame every this many seconds (the first frame always)
    max_frames_per_source: int | None = None
    per_source: int | None = None  # instead of every_s: this many frames spread over each clip
    cache_dir: str | Path = "cache/frames"
    arrays: list[np.ndarray] = field(default_factory=list, init=False)
    names: list[str] = field(default_factory=list, init=False)
    skipped: list[tuple[str, str]] = field(default_factory=list, init=False)

    def key(self, path: Path) -> str:
        st = path.stat()
        ident = f"v{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{self.size}|{self.every_s}|{self.max_frames_per_source}|{self.per_source}"
        return f"{path.stem[:40]}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}.npy"

    def decode(self, path: Path) -> np.ndarray:
        if is_image(path):
            frames: Iterable[np.ndarray] = [read_image(path)]
        elif self.per_source:
            frames = evenly_spaced_video_frames(path, self.per_source)
        else:
            frames = sampled_video_frames(path, self.every_s, self.max_frames_per_source)
        out = [frame_to_square(f, self.size) for f in frames]
        if not out:
            raise ValueError("no frames decoded")
        sides = {f.shape[0] for f in out}
        if len(sides) != 1:  # resolution changed mid-stream: keep the commonest
            common = max(sides, key=lambda s: sum(f.shape[0] == s for f in out))
            out = [f for f in out if f.shape[0] == common]
        return np.stack(out)

    def build(self, progress: bool = True) -> "FrameCache":
        cache_dir = Path(self.cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        it = self.sources
        if progress:
            from tqdm import tqdm
            it = tqdm(self.sources, desc=f"frames -> {cache_dir}", unit="file", leave=False)
        for path in it:
            path = Path(path)
            try:
                f = cache_dir / self.key(path)
                if f.exists():
                    arr = np.load(f)
                else:
                    arr = self.decode(path)
                    tmp = f.with_suffix(".tmp.npy")
                    np.save(tmp, arr)
                    tmp.replace(f)
            except Exception as e:  # corrupt or unreadable: report and go on
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"skipping unreadable source {path}: {msg}", stacklevel=2)
                self.skipped.append((str(path), msg))
                continue
            self.arrays.append(arr)
            self.names.append(str(path))
        return self

    @property
    def num_frames(self) -> int:
        return sum(len(a) for a in self.arrays)


class RandomCrops(torch.utils.data.Dataset):
    """Training view of a FrameCache: random `crop` x `crop` squares with random horizontal flips,
    as float (3, crop, crop) in [0, 1]. Sources smaller than the crop are left out."""

    def __init__(self, cache: FrameCache, crop: int, flip: bool = True, seed: int = 0) -> None:
        self.crop, self.flip = crop, flip
        self.arrays = [a for a in cache.arrays if a.shape[1] >= crop and a.shape[2] >= crop]
        self.index = [(i, j) for i, a in enumerate(self.arrays) for j in range(len(a))]
        if not self.index:
            raise ValueError(f"no cached frame is at least {crop}x{crop}")
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> torch.Tensor:
        i, j = self.index[k]
        frame = self.arrays[i][j]
        h, w = frame.shape[:2]
        y = int(self.rng.integers(0, h - self.crop + 1))
        x = int(self.rng.integers(0, w - self.crop + 1))
        patch = frame[y:y + self.crop, x:x + self.crop]
        if self.flip and self.rng.random() < 0.5:
            patch = patch[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float().div_(255.0)


class CentreCrops(torch.utils.data.Dataset):
    """Evaluation view: every cached frame, centre-cropped to `crop` (or its own side, a multiple
    of 8, when smaller)."""

    def __init__(self, cache: FrameCache, crop: int) -> None:
        from streamer.antialias import centre_crop

        self.frames = []
        for a in cache.arrays:
            side = min(crop, a.shape[1] // 8 * 8)
            self.frames.extend(np.ascontiguousarray(centre_crop(f, side)) for f in a)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self.frames[k]).permute(2, 0, 1).float().div_(255.0)


def build_sources(root: str | Path, layout: str = "folder", partition: str = "dev",
                  split: str = "all", val_fraction: float = 0.1, utterances: int | None = None,
                  seed: int = 0) -> list[Path]:
    """Files of one dataset: `layout` "folder" (everything under root) or "voxceleb"
    (`partition`, optionally `utterances` drawn at random, `split` train/val/all by identity)."""
    if layout == "folder":
        return folder_sources(root)
    if layout != "voxceleb":
        raise ValueError(f"unknown data layout {layout!r}; use 'folder' or 'voxceleb'")
    paths = voxceleb_sources(root, partition)
    if split != "all":
        train, val = split_identities(paths, val_fraction, seed)
        paths = train if split == "train" else val
    return sample_utterances(paths, utterances, seed)
