"""Fit (or refit) the entropy tables of a step-mode codec on training frames.

    python -m training.tables --weights checkpoints/cpu-lite/best.json --out streamer/weights/default

Training's stage 2 does this itself at every export; this is for weights whose tables are
missing or were fitted by an older context model. The encoder runs on `--frames` full-size
training frames spread evenly over the cache (`training.data.FrameCache`: the same sampling and
cache as training), and every quantizer level gets its tables from their codes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from streamer.codec import NeuralCodec, entropy, weights
from streamer.errors import StreamerError

from . import data as D
from .config import check_media, require_extra


def fit_tables(codec: NeuralCodec, frames: np.ndarray, batch: int = 32) -> np.ndarray:
    """Tables (levels, C, CONTEXTS, 256) from uint8 frames (N, H, W, 3) at the model's size."""
    with torch.inference_mode():
        y = torch.cat([codec.model.encoder(torch.from_numpy(frames[i:i + batch]).permute(0, 3, 1, 2).float() / 255)
                       for i in range(0, len(frames), batch)])
    return entropy.fit_levels(codec.quantizer, y)


def training_frames(root: str, size: int, count: int, every_s: float = 0.25,
                    cache_dir: str = "cache/frames") -> np.ndarray:
    cache = D.FrameCache(D.folder_sources(root), size=size, every_s=every_s, cache_dir=cache_dir).build()
    frames = [f for f in D.CentreCrops(cache, size).frames if f.shape[0] == size]
    if not frames:
        raise StreamerError(f"no readable training frames of {size} px under {root}")
    pick = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    return np.stack([frames[i] for i in pick])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.tables", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True, help="step-mode codec weights (.json/.safetensors or a name)")
    ap.add_argument("--train", default="/work/shared/data/train", help="folder of training videos/images")
    ap.add_argument("--out", required=True, help="where to write the weights with their new tables")
    ap.add_argument("--frames", type=int, default=1024, help="training frames to count codes on (default 1024)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        check_media(args.train, "--train")  # mistakes up front, before minutes of work
        require_extra("tqdm")  # the frame cache's progress bar
        cfg, model, _ = weights.load(args.weights, entropy_tables=False)  # old tables are replaced
        if cfg.quantizer.mode not in ("step", "fixed"):
            raise StreamerError(f"a {cfg.quantizer.mode} quantizer has no fixed codes to fit tables on")
        codec = NeuralCodec(cfg, model, 0)
        frames = training_frames(args.train, codec.frame_size, args.frames)
        codec.set_entropy_counts(fit_tables(codec, frames))
        cfg.training = {**cfg.training, "entropy_tables": f"python -m training.tables on {len(frames)} "
                        f"frames of {args.train}"}
        weights.save(args.out, cfg, codec.model)
    except StreamerError as e:
        print(f"tables: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out).with_suffix('.json')} with tables for {codec.levels} level(s) "
          f"from {len(frames)} frames", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
