"""How much would a motion-aligned reference help a coder in the intra model's latent space?

    python -m training.motion_probe --data ../shared/data/val [--frames 40] [--level 2] [--json]

For each clip, the latents of consecutive frames (the intra encoder at the call's framing), and
the energy of the next frame's latents minus the previous frame's:
- unshifted (what the learned P-frame coder's reference is today);
- shifted globally by the best of a grid of sub-cell translations (bilinear, steps of 1/4 cell =
  2 px at 224, up to ±1 cell = ±8 px);
- shifted per block of 4 × 4 cells (32 × 32 px) by the best of the same grid.

The best shift is chosen with the answer in hand (an oracle) and its motion vectors cost nothing
here, so the ratios are a bound on what such alignment could remove from the residual, not a
measured coder. Ratios are residual energy with the shift over without it (1.0: no help).

    python -m training.motion_probe chains --cache cache/conditional/val [--clips 18] [--json]

measures the call's block motion (streamer/codec/motion.py) with the shipped learned coder,
untrained for it: 60-frame chains (an I-frame at level 2, then learned P-frames at each level,
the sender's dead zone, real range-coded payloads with the shifts inside, every receiver's
reference checked) with the motion on, against the same chains with it off; BD-rates over all
clips, the still GRID ones and the others.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from streamer.codec.motion import BLOCK, MAX_QUARTERS as MAX_SHIFT_QUARTERS  # the call's block motion


def shift_grid(max_quarters: int = MAX_SHIFT_QUARTERS) -> list[tuple[float, float]]:
    """(dy, dx) in cells: every quarter-cell translation within ±max_quarters/4."""
    r = range(-max_quarters, max_quarters + 1)
    return [(dy / 4, dx / 4) for dy in r for dx in r]


def shifted(y: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """y (C, H, W) with its content moved by (dy, dx) cells: bilinear, edges replicated."""
    _, h, w = y.shape
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    sy, sx = (gy - dy).clamp(0, h - 1), (gx - dx).clamp(0, w - 1)
    grid = torch.stack([sx / max(w - 1, 1) * 2 - 1, sy / max(h - 1, 1) * 2 - 1], -1)[None]
    return F.grid_sample(y[None], grid, mode="bilinear", align_corners=True)[0]


def residual_ratios(latents: list[torch.Tensor], shifts: list[tuple[float, float]] | None = None,
                    block: int = BLOCK) -> dict[str, float]:
    """Residual energy of each frame's latents against the previous one's, shifted globally and
    per block by the best shift, over the energy unshifted (summed over the clip)."""
    shifts = shifts or shift_grid()
    plain = whole = blocks = 0.0
    for prev, cur in zip(latents, latents[1:]):
        c, h, w = cur.shape
        if h % block or w % block:
            raise ValueError(f"latents of {h}x{w} cells do not split into {block}x{block} blocks")
        plain += float(((cur - prev) ** 2).sum())
        err = torch.stack([(shifted(prev, dy, dx) - cur) ** 2 for dy, dx in shifts]).sum(1)  # (S, H, W)
        whole += float(err.sum((1, 2)).min())
        per_block = err.reshape(len(shifts), h // block, block, w // block, block).sum((2, 4))
        blocks += float(per_block.min(0).values.sum())
    if plain == 0:
        return {"global": 1.0, "per_block": 1.0}
    return {"global": whole / plain, "per_block": blocks / plain}


def aligned_chain(codec, model, clip: np.ndarray, level: int, intra_level: int, deadzone: float,
                  align: bool) -> tuple[float, torch.Tensor]:
    """training.conditional.learned_chain with the call's block motion on or off
    (`encode_frame(..., align=)`, the shifts inside the payload); (payload bits, latents)."""
    from streamer.codec.conditional import REF_FRAC, decode_frame, encode_frame, gaussian_coder, intra_reference
    from training.conditional import intra_codes

    coder = gaussian_coder()
    codes, _ = intra_codes(codec, clip[0], intra_level)
    bits = float(codec.entropy.estimate_bits(codes, intra_level).sum())
    first, _, step = codec.quantizer.grid(intra_level)
    ref = intra_reference(codes, first, step)
    receiver, out = ref.clone(), [ref]
    for t in range(1, len(clip)):
        y = torch.from_numpy(clip[t].astype(np.float32))[None]
        payload, ref = encode_frame(model, coder, y, ref, level, deadzone, align=align)
        receiver = decode_frame(model, coder, payload, receiver, level, align=align)
        if not torch.equal(receiver, ref):
            raise RuntimeError(f"frame {t}: the receiver's reference is not the sender's")
        bits += 8 * len(payload)
        out.append(ref)
    return bits, torch.cat(out) / (1 << REF_FRAC)


def chains(cache_dir: str, clips: int, weights: str = "default", intra_level: int = 2,
           deadzone: float | None = None, names: list[str] | None = None) -> dict:
    """Plain and aligned learned chains of the cached clips at every level, and BD-rates."""
    from streamer.codec import NeuralCodec
    from streamer.codec.conditional import SENDER_DEADZONE, shipped_for
    from training.conditional import FPS, load_cache, psnr
    from training.video_eval import bd_rate

    deadzone = SENDER_DEADZONE if deadzone is None else deadzone
    codec = NeuralCodec.load(weights)
    model = shipped_for(codec.model_id)
    latents, pixels = load_cache(cache_dir)
    idx = list(range(min(clips, len(latents))))
    rows = []
    for level in range(model.levels):
        per_clip = {k: [] for k in ("plain_kbps", "plain_psnr", "aligned_kbps", "aligned_psnr")}
        clip_kbps = lambda bits: bits / latents.shape[1] * FPS / 1000  # noqa: E731
        for i in idx:
            y = np.asarray(latents[i], np.float32)
            for name in ("plain", "aligned"):
                b, lat = aligned_chain(codec, model, y, level, intra_level, deadzone, name == "aligned")
                per_clip[f"{name}_kbps"].append(clip_kbps(b))
                per_clip[f"{name}_psnr"].append(psnr(codec.model.decoder, lat, np.asarray(pixels[i])))
        row = {"level": level, **{k: float(np.mean(v)) for k, v in per_clip.items()}, "per_clip": per_clip}
        rows.append(row)
        print(f"level {level}: plain {row['plain_kbps']:6.1f} kbps {row['plain_psnr']:.2f} dB | aligned "
              f"{row['aligned_kbps']:6.1f} kbps {row['aligned_psnr']:.2f} dB (shifts included)", flush=True)

    def curve(key: str, clips: list[int]) -> tuple[list[float], list[float]]:
        def mean(r: dict, k: str) -> float:
            return float(np.mean([r["per_clip"][k][j] for j in clips]))
        return [mean(r, f"{key}_kbps") for r in rows], [mean(r, f"{key}_psnr") for r in rows]

    groups = {"all": list(range(len(idx)))}
    if names is not None:  # GRID's still heads apart from the clips that move
        still = [j for j, n in enumerate(names[:len(idx)]) if "GRID" in n or "vcd" in n]
        groups.update({"still": still, "moving": [j for j in range(len(idx)) if j not in still]})
    bd = {}
    for group, clips_of in groups.items():
        if not clips_of:
            continue
        bd[group] = bd_rate(curve("plain", clips_of), curve("aligned", clips_of))
        print(f"{group} ({len(clips_of)} clips): BD-rate with block motion against without: "
              + ("no overlap" if bd[group] is None else f"{bd[group]:+.1f} %"))
    return {"cache": cache_dir, "clips": len(idx), "names": names, "deadzone": deadzone,
            "intra_level": intra_level, "rows": rows, "bd_rate": bd}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chains"]:
        return main_chains(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m training.motion_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/val")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--frames", type=int, default=40, help="frames per clip (the first ones)")
    ap.add_argument("--level", type=int, default=2, help="the quantizer level whose latents are used")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from pathlib import Path

    from streamer.cli import load_codec
    from training.video_eval import load_video_clips

    if not Path(args.data).is_dir():
        print(f"motion probe: no data folder at {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    codec = load_codec(args.weights, "eager", 1)
    clips = load_video_clips(args.data, max_frames=args.frames, log=lambda s: print(s, file=sys.stderr))
    rows = []
    for clip in clips:
        latents = [torch.from_numpy(codec.encode_with_latents(f, args.level)[0]).float() for f in clip.frames]
        rows.append({"clip": clip.name, "frames": len(latents), **residual_ratios(latents)})
        if not args.json:
            r = rows[-1]
            print(f"{r['clip'][:48]:48s} global {r['global']:.3f}  per block {r['per_block']:.3f}", flush=True)
    if args.json:
        print(json.dumps({"data": args.data, "weights": args.weights, "level": args.level, "rows": rows,
                          "median_per_block": float(np.median([r["per_block"] for r in rows]))}, indent=1))
    return 0


def main_chains(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.motion_probe chains")
    ap.add_argument("--cache", default="cache/conditional/val",
                    help="`python -m training.conditional cache` of the val clips")
    ap.add_argument("--data", default="../shared/data/val", help="the clips the cache holds, for their names")
    ap.add_argument("--clips", type=int, default=18)
    ap.add_argument("--json", default=None, metavar="PATH", help="write the report here")
    args = ap.parse_args(argv)

    from pathlib import Path

    from streamer.errors import StreamerError
    from training import data as D

    torch.set_num_threads(1)
    names = None
    if Path(args.data).is_dir():
        names = [p.name for p in D.folder_sources(args.data) if D.is_video(p)]
    try:
        report = chains(args.cache, args.clips, names=names)
    except StreamerError as e:
        print(f"motion probe: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
