"""Train and measure the learned conditional P-frame coder (streamer/codec/conditional.py).

The intra autoencoder stays frozen: its latents of consecutive frames are cached once, and the
conditional coder learns on them. A training sample is a clip's frame t coded intra at a random
level (the reference an I-frame leaves), then frames t+1 .. t+K coded as P-frames at the same
level, each against the reconstruction before it (closed loop, as in a call). The loss is the
rate the coder would spend (bits from its own Gaussian prior, per pixel) plus lambda * MSE of the
frozen intra decoder's picture on a random crop, one lambda per level.

    python -m training.conditional cache --data ../shared/data/train --out cache/conditional/train
    python -m training.conditional cache --data ../shared/data/val --clips 18 --out cache/conditional/val
    python -m training.conditional train --cache cache/conditional/train --dir checkpoints/conditional --steps 3000
    python -m training.conditional evaluate --cache cache/conditional/val --dir checkpoints/conditional
    python -m training.conditional export --dir checkpoints/conditional   # -> streamer/weights/conditional/
    python -m training.conditional evaluate --cache cache/conditional/val   # the shipped coder

`train` resumes from the directory's checkpoint (safetensors + JSON, training/checkpoint.py), so
a run can go on in a later session: `--steps` is the total. On a machine without the checkpoint,
`--init default` goes on from the shipped coder (its steps count; Adam starts afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from streamer.codec import NeuralCodec
from streamer.codec import conditional
from streamer.codec.conditional import REF_FRAC, ConditionalCoder, intra_reference
from streamer.codec.codec import to_tensor, to_uint8
from streamer.codec.decision import keep_reference, unrounded_codes
from streamer.errors import StreamerError

from .checkpoint import has_checkpoint, load_checkpoint, restore_optimizer, save_checkpoint
from .metrics import mse_uint8, psnr_from_mse

FPS = 30
UNROLL = 3  # P-frames per sample that the loss sees
WARMUP = 8  # up to this many P-frames before them, without gradients: references a call has
            # after a run of P-frames, not only fresh I-frames (a call's chains are 150 long)
BATCH = 8
CROP = 14  # latents per side of the decoded crop (112 px)
MARGIN = 16  # pixels at each edge of the crop the loss leaves out (the decoder sees no context there)
LR, LR_END = 1e-3, 1e-4
LEVELS = 7  # the intra quantizer's finest levels the coder learns (of 9; `--levels`)


def lambdas(levels: int) -> list[float]:
    """loss = bits per pixel + lambda * MSE (0..255): halving lambda per level roughly matches
    the slope of the intra quantizer's levels (measured on the table-based P-frames)."""
    return [0.2 * 0.5 ** lv for lv in range(levels)]


def get_lr(step: int, steps: int) -> float:
    return LR if step < 0.8 * steps else LR_END


# -- data ------------------------------------------------------------------------------------------
def cache(data: str, out: str, clips: int, frames: int, weights: str) -> None:
    """Frames (N, T, 224, 224, 3) uint8 and their intra latents (N, T, C, 28, 28) float16."""
    from .tables import training_clips

    codec = NeuralCodec.load(weights)
    t0 = time.time()
    seqs = [c[:frames] for c in training_clips(data, codec.frame_size, clips, frames) if len(c) >= frames]
    if not seqs:
        raise StreamerError(f"no clip of {frames} frames under {data}")
    pixels = np.stack(seqs)
    with torch.inference_mode():
        latents = np.stack([np.concatenate([codec.encoder(to_tensor(c[i:i + 30])).numpy() for i in range(0, frames, 30)])
                            for c in pixels]).astype(np.float16)
    Path(out).mkdir(parents=True, exist_ok=True)
    np.save(Path(out) / "pixels.npy", pixels)
    np.save(Path(out) / "latents.npy", latents)
    print(f"cached {len(pixels)} clips x {frames} frames in {out} ({time.time() - t0:.0f} s)")


def load_cache(path: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(path)
    if not (d / "latents.npy").is_file() or not (d / "pixels.npy").is_file():
        raise StreamerError(f"no cache in {d}: run `python -m training.conditional cache --out {d}` first")
    return np.load(d / "latents.npy", mmap_mode="r"), np.load(d / "pixels.npy", mmap_mode="r")


# -- training --------------------------------------------------------------------------------------
def batch(latents: np.ndarray, pixels: np.ndarray, rng: np.random.Generator, steps: list[float], warmup: int = 0):
    """(y (B, W+K+1, C, H, W), pixels of the last K frames cropped (B, K, 3, h, w), level (B,),
    crop origin): an I-frame, W warm-up P-frames, then the K the loss sees."""
    n, t = latents.shape[:2]
    span = warmup + UNROLL + 1
    clip, start = rng.integers(0, n, BATCH), rng.integers(0, t - span + 1, BATCH)
    y = torch.from_numpy(np.stack([latents[c, s:s + span] for c, s in zip(clip, start)]).astype(np.float32))
    r, c = rng.integers(0, latents.shape[-1] - CROP + 1, 2)
    px = np.stack([pixels[i, s + span - UNROLL:s + span, r * 8 + MARGIN:(r + CROP) * 8 - MARGIN,
                          c * 8 + MARGIN:(c + CROP) * 8 - MARGIN] for i, s in zip(clip, start)])
    x = torch.from_numpy(px.astype(np.float32) / 255).permute(0, 1, 4, 2, 3)
    level = torch.from_numpy(rng.integers(0, len(steps), BATCH))
    return y, x, level, (int(r), int(c))


def train(cache_dir: str, directory: str, steps: int, weights: str, seed: int, init: str | None = None,
          deadzone: float = 0.0, warmup: int = 0, levels: int = LEVELS) -> None:
    """Train to `steps` in all: from the checkpoint in `directory` when there is one, else from
    a saved coder `init` (its steps count; Adam starts afresh), else from scratch.
    deadzone: round as the sender does (ConditionalCoder.forward); warmup: up to this many
    P-frames (a random count per batch) code the reference before the ones the loss sees.
    levels: the intra quantizer's finest ones the coder learns (an `init` with fewer gets the
    others, starting at the intra steps)."""
    codec = NeuralCodec.load(weights)
    decoder = codec.model.decoder.eval().requires_grad_(False)
    intra_steps = codec.cfg.quantizer.steps
    if levels < 1:
        raise StreamerError(f"--levels {levels}: give 1 to {len(intra_steps)} (the intra quantizer's levels)")
    levels = min(len(intra_steps), levels)
    model = ConditionalCoder(intra_steps[:levels])
    opt = torch.optim.Adam(model.parameters(), LR)
    lam = torch.tensor(lambdas(levels))
    start, elapsed = 0, 0.0
    if has_checkpoint(directory):
        state, opt_tensors, info = load_checkpoint(directory)
        model.load_state_dict(state)
        restore_optimizer(opt, opt_tensors, info["optimizer"])
        start, elapsed = info["step"], info["elapsed_s"]
        print(f"resumed at step {start} ({elapsed / 60:.0f} min trained)")
    elif init is not None:
        saved = conditional.load(init, codec.model_id)
        if saved.levels > levels:
            raise StreamerError(f"--init {init} has {saved.levels} levels, this training {levels}")
        state = saved.state_dict()
        state["log_step"] = torch.cat([state["log_step"], model.log_step.detach()[saved.levels:]])  # new levels
        model.load_state_dict(state)
        start, elapsed = int(saved.info["training"].get("steps", 0)), 60.0 * float(saved.info["training"].get("minutes", 0))
        print(f"started from {init} (step {start}, {elapsed / 60:.0f} min trained; a new optimizer)")
    latents, pixels = load_cache(cache_dir)
    warmup = max(0, min(warmup, latents.shape[1] - UNROLL - 1))  # what the cached clips can hold
    rng = np.random.default_rng(seed + start)
    t0, log = time.time(), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = get_lr(step, steps)
        w = int(rng.integers(0, warmup + 1))
        y, x, level, (r, c) = batch(latents, pixels, rng, intra_steps[:levels], w)
        step_i = torch.tensor(intra_steps)[level][:, None, None, None]
        ref = torch.round(y[:, 0] / step_i) * step_i  # the I-frame's latents
        with torch.no_grad():
            for k in range(w):
                ref, _ = model(y[:, k + 1], ref, level, deadzone)
        loss, rate, mse = 0.0, 0.0, 0.0
        for k in range(UNROLL):
            ref, bits = model(y[:, w + k + 1], ref, level, deadzone)
            picture = decoder(ref[:, :, r:r + CROP, c:c + CROP])[:, :, MARGIN:-MARGIN, MARGIN:-MARGIN]
            err = ((picture - x[:, k]) ** 2).mean((1, 2, 3)) * 255 ** 2
            bpp = bits.sum((1, 2, 3)) / (y.shape[-1] * y.shape[-2] * 64)
            loss = loss + (bpp + lam[level] * err).mean() / UNROLL
            rate, mse = rate + bpp.mean().item() / UNROLL, mse + err.mean().item() / UNROLL
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append((loss.item(), rate, mse))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            a = np.mean(log, 0)
            log = []
            print(f"step {step + 1}: loss {a[0]:.4f}  bpp {a[1]:.4f}  mse {a[2]:.2f}  "
                  f"{(time.time() - t0) / 60:.1f} min", flush=True)
        if (step + 1) % 200 == 0 or step + 1 == steps:
            save_checkpoint(directory, model, opt, {"step": step + 1, "elapsed_s": elapsed + time.time() - t0,
                                                    "weights": weights, "levels": levels, "seed": seed,
                                                    "cache": str(cache_dir), "init": init,
                                                    "deadzone": deadzone, "warmup": warmup,
                                                    "threads": torch.get_num_threads()})
    print(f"checkpoint in {directory}")


def export(directory: str, out: str, weights: str) -> None:
    """The checkpoint's coder as shipped weights (safetensors + JSON, no optimizer state)."""
    import platform

    if not has_checkpoint(directory):
        raise StreamerError(f"no checkpoint in {directory}: train first")
    codec = NeuralCodec.load(weights)
    model, info = coder_from_checkpoint(codec, directory)
    training = {"steps": info["step"], "minutes": round(info["elapsed_s"] / 60, 1), "batch": BATCH,
                "unroll": UNROLL, "lambdas": lambdas(info["levels"]), "seed": info.get("seed"),
                "intra_weights": weights, "cache": info.get("cache"), "init": info.get("init"),
                "deadzone": info.get("deadzone", 0.0), "warmup": info.get("warmup", 0),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                           f"{info.get('threads', '?')} thread(s)",
                "command": "python -m training.conditional train"}
    js, st = conditional.save(out, model, codec.model_id, training)
    print(f"exported step {info['step']} to {js} and {st}")


def coder_from_checkpoint(codec: NeuralCodec, directory: str) -> tuple[ConditionalCoder, dict]:
    """(the checkpoint's coder in eval mode, the checkpoint's info)."""
    state, _, info = load_checkpoint(directory)
    model = ConditionalCoder(codec.cfg.quantizer.steps[:info["levels"]])
    model.load_state_dict(state)
    return model.eval(), info


def load_coder(codec: NeuralCodec, directory: str | None, coder: str | None) -> tuple[ConditionalCoder | None, dict]:
    """The coder to evaluate: the checkpoint in `directory`, else the saved coder `coder`
    (None, {} when neither is given or the directory has no checkpoint)."""
    if directory is not None and has_checkpoint(directory):
        model, info = coder_from_checkpoint(codec, directory)
        return model, {"steps": info["step"], "minutes": round(info["elapsed_s"] / 60, 1)}
    if coder is not None:
        model = conditional.load(coder, codec.model_id)
        return model, dict(model.info["training"])  # type: ignore[attr-defined]
    return None, {}


# -- evaluation ------------------------------------------------------------------------------------
def psnr(decoder, latents: torch.Tensor, pixels: np.ndarray) -> float:
    """Mean PSNR of the pictures the intra decoder makes of (T, C, H, W) latents."""
    with torch.inference_mode():
        out = np.concatenate([to_uint8(decoder(latents[i:i + 30])) for i in range(0, len(latents), 30)])
    return psnr_of_pictures(out, pixels)


def intra_codes(codec: NeuralCodec, y: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(the codes of latents y (C, H, W) at `level`, their unrounded values), as the quantizer."""
    _, count, _ = codec.quantizer.grid(level)
    u = unrounded_codes(codec.quantizer, y, level)
    return np.clip(np.rint(u), 0, (count - 1)[:, None, None]).astype(np.uint8), u


def table_chain(codec: NeuralCodec, clip: np.ndarray, level: int) -> tuple[float, torch.Tensor]:
    """Today's P-frames at a fixed level: bits of the clip and its decoded latents."""
    codes, _ = intra_codes(codec, clip[0], level)
    bits = float(codec.entropy.estimate_bits(codes, level).sum())
    ref, sent_all = codes, [codes]
    for t in range(1, len(clip)):
        c, u = intra_codes(codec, clip[t], level)
        sent = keep_reference(c, u, ref, 0.8)
        bits += float(codec.residual.estimate_bits(sent.astype(np.int16) - ref.astype(np.int16), level).sum())
        ref = sent
        sent_all.append(sent)
    first, _, step = codec.quantizer.grid(level)
    return bits, torch.from_numpy(((np.stack(sent_all) + first[None, :, None, None]) * step).astype(np.float32))


def learned_chain(codec: NeuralCodec, model: ConditionalCoder, clip: np.ndarray, level: int,
                  intra_level: int, deadzone: float = 0.0, timing: dict | None = None) -> tuple[float, torch.Tensor]:
    """An I-frame at `intra_level`, then the learned P-frames at `level`: their real range-coded
    payloads (streamer/codec/conditional.py's `encode_frame`), decoded by a receiver of its own
    (`decode_frame` on its own reference, which must stay the sender's: StreamerError if not).
    Bits of the clip and its latents; `timing` collects encode/decode milliseconds per frame."""
    from streamer.codec.conditional import decode_frame, encode_frame, gaussian_coder

    coder = gaussian_coder()
    codes, _ = intra_codes(codec, clip[0], intra_level)
    bits = float(codec.entropy.estimate_bits(codes, intra_level).sum())
    first, _, step = codec.quantizer.grid(intra_level)
    ref = intra_reference(codes, first, step)
    receiver = ref.clone()
    out = [ref]
    for t in range(1, len(clip)):
        t0 = time.perf_counter()
        payload, ref = encode_frame(model, coder, torch.from_numpy(clip[t].astype(np.float32))[None], ref, level,
                                    deadzone)
        t1 = time.perf_counter()
        receiver = decode_frame(model, coder, payload, receiver, level)
        t2 = time.perf_counter()
        if not torch.equal(receiver, ref):
            raise StreamerError(f"frame {t}: the receiver's reference is not the sender's")
        if timing is not None:
            timing.setdefault("encode_ms", []).append((t1 - t0) * 1000)
            timing.setdefault("decode_ms", []).append((t2 - t1) * 1000)
        bits += 8 * len(payload)
        out.append(ref)
    return bits, torch.cat(out) / (1 << REF_FRAC)


def anchor_rows(pixels: np.ndarray, kind: str, kbps: list[float]) -> list[dict]:
    """x264 or VP8 (training/video_eval.py's settings) on the same clips, one row per target."""
    from .video_eval import AnchorCoder

    rows = []
    for target in kbps:
        nbytes, db = 0, 0.0
        for clip in pixels:
            coder = AnchorCoder(kind, target, FPS, clip.shape[1:3])
            out = []
            for frame in clip:
                packets = coder.encode(np.asarray(frame))
                nbytes += sum(len(p) for p in packets)
                out.append(coder.decode(packets))
            db += psnr_of_pictures(np.stack(out), np.asarray(clip))
        rows.append({"coder": kind, "target_kbps": target, "kbps": nbytes * 8 / pixels[:, :, 0, 0, 0].size * FPS / 1000,
                     "psnr": db / len(pixels)})
        print(f"{kind:8s} {target:5.0f} kbps: {rows[-1]['kbps']:7.1f} kbps  {rows[-1]['psnr']:.2f} dB", flush=True)
    return rows


def psnr_of_pictures(out: np.ndarray, ref: np.ndarray) -> float:
    """Mean over frames of the PSNR of (T, H, W, 3) uint8 pictures."""
    return float(np.mean([psnr_from_mse(mse_uint8(o, r)) for o, r in zip(out, ref)]))


def evaluate(cache_dir: str, directory: str | None, weights: str, clips: int, intra_level: int,
             anchors: list[str], kbps: list[float], deadzone: float = 0.0, tables: bool = True,
             coder: str | None = None) -> dict:
    """RD points of table-based and learned P-frame chains (an I-frame, then P-frames at one
    level) and of the anchors on the same clips, with BD-rates between them. The learned coder
    is the checkpoint in `directory`, else the saved coder `coder`."""
    from .video_eval import bd_rate

    codec = NeuralCodec.load(weights)
    latents, pixels = load_cache(cache_dir)
    latents, pixels = latents[:clips], pixels[:clips]
    rows = []
    model, trained = load_coder(codec, directory, coder)
    timing: dict = {}
    for kind in ("tables", "learned"):
        if (kind == "learned" and model is None) or (kind == "tables" and not tables):
            continue
        for level in range(model.levels if model is not None else 7):  # tables on the learned levels
            bits = db = 0.0
            for i in range(len(latents)):
                y = np.asarray(latents[i], np.float32)
                b, lat = (table_chain(codec, y, level) if kind == "tables"
                          else learned_chain(codec, model, y, level, intra_level, deadzone, timing))
                bits += b
                db += psnr(codec.model.decoder, lat, np.asarray(pixels[i]))
            frames = len(latents) * latents.shape[1]
            rows.append({"coder": kind, "level": level, "kbps": bits / frames * FPS / 1000, "psnr": db / len(latents)})
            print(f"{kind:8s} level {level}: {rows[-1]['kbps']:7.1f} kbps  {rows[-1]['psnr']:.2f} dB", flush=True)
    for kind in anchors:
        rows += anchor_rows(np.asarray(pixels), kind, kbps)

    def curve(name: str) -> tuple[list[float], list[float]]:
        return [r["kbps"] for r in rows if r["coder"] == name], [r["psnr"] for r in rows if r["coder"] == name]

    names = sorted({r["coder"] for r in rows})
    bd = {f"{test}_vs_{anchor}": bd_rate(curve(anchor), curve(test))
          for test in ("learned", "tables") for anchor in names if test in names and anchor != test}
    for k, v in bd.items():
        print(f"BD-rate {k}: " + ("no overlap" if v is None else f"{v:+.1f} %"))
    speed = {k: float(np.median(v)) for k, v in timing.items()}
    if speed:
        print(f"learned P-frame path, median per frame, {torch.get_num_threads()} thread(s): encode "
              f"{speed['encode_ms']:.1f} ms, decode {speed['decode_ms']:.1f} ms (latents only; range coding "
              "included); every receiver's reference equal to its sender's")
    return {"clips": len(latents), "frames_per_clip": int(latents.shape[1]), "intra_level": intra_level,
            "deadzone": deadzone, "steps_trained": trained.get("steps"), "trained_minutes": trained.get("minutes"),
            "rows": rows, "bd_rate": bd, "median_ms": speed, "references_identical": bool(speed)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.conditional", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="cache frames and intra latents of consecutive frames")
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--clips", type=int, default=60)
    c.add_argument("--frames", type=int, default=60)
    t = sub.add_parser("train", help="train (resumes from --dir)")
    t.add_argument("--cache", required=True)
    t.add_argument("--dir", required=True)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--levels", type=int, default=LEVELS,
                   help=f"the intra quantizer's finest levels to learn (default {LEVELS})")
    t.add_argument("--deadzone", type=float, default=0.0,
                   help="round as the sender does, with this dead zone in steps (0: additive noise)")
    t.add_argument("--warmup", type=int, default=0,
                   help=f"up to this many P-frames before the {UNROLL} the loss sees (e.g. {WARMUP})")
    t.add_argument("--init", metavar="CODER", help="start from a saved coder (e.g. default, the shipped "
                   "one) when --dir has no checkpoint")
    x = sub.add_parser("export", help="the checkpoint's coder as shipped weights")
    x.add_argument("--dir", required=True)
    x.add_argument("--out", default=str(conditional.PACKAGED / "default"),
                   help="the weights' path without suffix (default: the package's)")
    e = sub.add_parser("evaluate", help="RD of table-based and learned P-frame chains")
    e.add_argument("--cache", required=True)
    e.add_argument("--dir", help="a training checkpoint's directory")
    e.add_argument("--coder", default="default", help="a saved coder, when --dir has no checkpoint "
                   "(default: the shipped one)")
    e.add_argument("--clips", type=int, default=18)
    e.add_argument("--intra-level", type=int, default=2)
    e.add_argument("--anchors", default="x264,vp8", help="comma-separated: x264, vp8 (empty: none)")
    e.add_argument("--kbps", default="100,150,300,500", help="the anchors' targets")
    e.add_argument("--deadzone", type=float, default=conditional.SENDER_DEADZONE,
                   help=f"the learned sender's RD decision, in steps (default {conditional.SENDER_DEADZONE}, the call's)")
    e.add_argument("--tables", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the table-based P-frames")
    e.add_argument("--json", metavar="PATH")
    for s in (c, t, e, x):
        s.add_argument("--weights", default="default")
        s.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.command == "cache":
            cache(args.data, args.out, args.clips, args.frames, args.weights)
        elif args.command == "train":
            torch.manual_seed(args.seed)
            train(args.cache, args.dir, args.steps, args.weights, args.seed, args.init, args.deadzone, args.warmup,
                  args.levels)
        elif args.command == "export":
            export(args.dir, args.out, args.weights)
        else:
            report = evaluate(args.cache, args.dir, args.weights, args.clips, args.intra_level,
                              [a for a in args.anchors.split(",") if a], [float(k) for k in args.kbps.split(",")],
                              args.deadzone, args.tables, args.coder)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    except StreamerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
