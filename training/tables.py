"""Fit (or refit) the entropy tables of a step-mode codec on training frames.

    python -m training.tables --weights checkpoints/cpu-lite/best.json --out streamer/weights/default

Training's stage 2 does this itself at every export; this is for weights whose tables are
missing or were fitted by an older context model. The encoder runs on `--frames` full-size
training frames spread evenly over the cache (`training.data.FrameCache`: the same sampling and
cache as training), and every quantizer level gets its tables from their codes.

    python -m training.tables --weights default --out streamer/weights/default --residual-only

fits the P-frame residual tables (`streamer/codec/residual.py`) and keeps the intra tables:
consecutive frames of `--clips` training videos at the call's framing (the FOMM Gaussian to the
model's size, `--clip-frames` frames from each clip's start), each frame's codes against the
previous frame's, at every level. `--steps 0.05,0.07,...` gives the quantizer a new ladder
of steps (e.g. coarser levels for lower bitrates); with `--residual-only`, levels whose step is
unchanged keep their intra tables and new ones get theirs fitted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from streamer.codec import NeuralCodec, entropy, residual, weights
from streamer.errors import StreamerError

from . import data as D
from .config import check_media, require_extra


def fit_tables(codec: NeuralCodec, frames: np.ndarray, batch: int = 32) -> np.ndarray:
    """Tables (levels, C, CONTEXTS, 256) from uint8 frames (N, H, W, 3) at the model's size."""
    with torch.inference_mode():
        y = torch.cat([codec.model.encoder(torch.from_numpy(frames[i:i + batch]).permute(0, 3, 1, 2).float() / 255)
                       for i in range(0, len(frames), batch)])
    return entropy.fit_levels(codec.quantizer, y)


def fit_residual_tables(codec: NeuralCodec, clips: list[np.ndarray], batch: int = 32,
                        decision_threshold: float | None = None) -> np.ndarray:
    """Residual tables (levels, C, CONTEXTS, 511) from clips of consecutive uint8 frames (T, H, W, 3).
    decision_threshold: fit on the residuals a sender with this P-frame decision sends
    (`streamer.codec.decision`: each frame against the codes sent for the previous one);
    None or 0: each frame's nearest codes against the previous frame's."""
    sequences = []
    with torch.inference_mode():
        for frames in clips:
            sequences.append(torch.cat([
                codec.model.encoder(torch.from_numpy(frames[i:i + batch]).permute(0, 3, 1, 2).float() / 255)
                for i in range(0, len(frames), batch)]))
    if not decision_threshold:
        return residual.fit_levels(codec.quantizer, sequences)
    return decided_residual_tables(codec, sequences, decision_threshold)


def decided_residual_tables(codec: NeuralCodec, sequences: list[torch.Tensor], threshold: float) -> np.ndarray:
    """As `residual.fit_levels`, on the residuals of a sender that keeps the reference's code
    within `threshold` steps (the chain of sent codes, as `EncoderSession` makes it)."""
    from streamer.codec.decision import keep_reference, unrounded_codes

    tables = []
    for lv in range(codec.levels):
        sizes, _ = codec.quantizer.alphabet(lv)
        res = []
        for y in sequences:
            latents = y.float().numpy()
            codes = [q.codes for q in codec.quantizer.quantize(y, lv)]
            ref = codes[0]
            for n in range(1, len(codes)):
                sent = keep_reference(codes[n], unrounded_codes(codec.quantizer, latents[n], lv), ref, threshold)
                res.append(residual.residuals(sent, ref))
                ref = sent
        tables.append(residual.fit(np.stack(res), sizes))
    return np.stack(tables)


def training_clips(root: str, size: int, clips: int, frames: int) -> list[np.ndarray]:
    """Up to `clips` videos under `root` (spread over the sorted list), `frames` consecutive
    frames each from the start, at the call's framing."""
    from streamer.sources import prepare
    from streamer.video import read_frames

    videos = [p for p in D.folder_sources(root) if D.is_video(p)]
    if not videos:
        raise StreamerError(f"no training videos under {root}")
    pick = np.linspace(0, len(videos) - 1, num=min(clips, len(videos))).round().astype(int)
    out = []
    for i in dict.fromkeys(pick.tolist()):
        try:
            seq = [prepare(f, size) for f in read_frames(videos[i], frames)]
        except StreamerError as e:
            print(f"skipped {videos[i]}: {e}", file=sys.stderr)
            continue
        if len(seq) >= 2:
            out.append(np.stack(seq))
    if not out:
        raise StreamerError(f"no readable training videos under {root}")
    return out


def parse_steps(text: str) -> list[float]:
    try:
        steps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StreamerError(f"--steps {text!r}: expected numbers separated by commas, e.g. 0.05,0.07,0.1") from None
    if not steps or steps[0] <= 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise StreamerError(f"--steps {text!r}: positive steps, finest first, each coarser than the last")
    return steps


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
    ap.add_argument("--steps", default=None, metavar="S0,S1,...",
                    help="a new ladder of quantizer steps, finest first (step mode)")
    ap.add_argument("--residual-only", action="store_true",
                    help="fit only the P-frame residual tables (keep the intra tables)")
    ap.add_argument("--clips", type=int, default=64, help="training videos for the residual tables (default 64)")
    ap.add_argument("--clip-frames", type=int, default=60,
                    help="consecutive frames from each clip for the residual tables (default 60)")
    ap.add_argument("--decision-threshold", type=float, default=0.0, metavar="T",
                    help="fit the residual tables on what a sender with this P-frame decision sends "
                         "(EncoderSession's decision_threshold, in quantizer steps; default 0: nearest codes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        check_media(args.train, "--train")  # mistakes up front, before minutes of work
        if not 0 <= args.decision_threshold < 1.5:
            raise StreamerError(f"--decision-threshold {args.decision_threshold:g}: quantizer steps in [0, 1.5)")
        require_extra("tqdm")  # the frame cache's progress bar
        # old tables are replaced (the intra ones are kept with --residual-only)
        cfg, model, _ = weights.load(args.weights, entropy_tables=args.residual_only)
        if cfg.quantizer.mode not in ("step", "fixed"):
            raise StreamerError(f"a {cfg.quantizer.mode} quantizer has no fixed codes to fit tables on")
        old_steps, old_counts = list(cfg.quantizer.steps), cfg.entropy_counts
        if args.steps:
            cfg.quantizer.steps = parse_steps(args.steps)
            cfg.quantizer.level = min(cfg.quantizer.level, len(cfg.quantizer.steps) - 1)
            cfg.entropy_counts = cfg.residual_counts = None
        codec = NeuralCodec(cfg, model, 0)
        if args.residual_only and args.steps:  # keep the tables of unchanged steps, fit the new ones
            frames = training_frames(args.train, codec.frame_size, args.frames)
            counts = fit_tables(codec, frames)
            for lv, step in enumerate(cfg.quantizer.steps):
                if old_counts is not None and step in old_steps:
                    counts[lv] = old_counts[old_steps.index(step)]
            codec.set_entropy_counts(counts)
        elif not args.residual_only:
            frames = training_frames(args.train, codec.frame_size, args.frames)
            codec.set_entropy_counts(fit_tables(codec, frames))
            cfg.training = {**cfg.training, "entropy_tables": f"python -m training.tables on {len(frames)} "
                            f"frames of {args.train}"}
        if cfg.quantizer.mode == "step":
            clips = training_clips(args.train, codec.frame_size, args.clips, args.clip_frames)
            codec.set_residual_counts(fit_residual_tables(codec, clips, decision_threshold=args.decision_threshold))
            cfg.training = {**cfg.training, "residual_tables": f"python -m training.tables on {len(clips)} clips "
                            f"x {args.clip_frames} consecutive frames of {args.train}"
                            + (f", decision threshold {args.decision_threshold:g}" if args.decision_threshold else "")}
        weights.save(args.out, cfg, codec.model)
    except StreamerError as e:
        print(f"tables: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out).with_suffix('.json')} with tables for {codec.levels} level(s)"
          + (" (P-frame residual tables too)" if codec.residual is not None else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
