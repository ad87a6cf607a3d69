"""`python -m streamer.bench codec`: encode / decode / pack / unpack time per backend, preset and size.

For every preset, frame size and batch size it times, on real frames (the bundled sample clip,
centre-cropped to the size):

* encode: `codec.encode_batch(frames)`, uint8 frames in, quantized codes (NumPy) out: tensor
  conversion, the encoder and the quantizer;
* decode: codes to uint8 pictures: dequantize, the decoder, conversion back;
* pack / unpack: `NeuralCodec.pack` of each frame's codes / `NeuralCodec.unpack` of each packet
  (range coding included when the model has entropy tables)
  (no model involved: measured once per preset, size and batch and shown on each of its rows);
* p_pack / p_unpack, when the model codes P-frames: the P-frame path of one frame after the
  encoder, on consecutive frames of the clip at the default level, as the call's session runs
  it: the decision against the previous frame's codes, the residuals, `pack_inter` (range
  coding against the residual tables, slices of one SCTP chunk), and unpacking those slices;
  `p_packet_bytes` is a P-frame's size. (The networks are the same for I- and P-frames, so
  encode and decode above are the P-frame's too.)
* learned_p_*, when the shipped learned conditional coder (streamer/codec/conditional.py) fits
  the model: its P-frame path on the same consecutive frames at the default level, per frame,
  after the intra encoder and before the intra decoder (both timed above): `encode_frame`
  (context, conditional encoder, the two-pass prior, range coding, the next reference) and
  `decode_frame` (the receiver's half), and its payload's bytes (`--p-frames learned` in a call).

Times are per call (a whole batch), median and 99th percentile over --repeats calls after warm-up
calls (which also absorb torch.compile / int8 compilation, reported as first_call_s). Beside wall
time, `enc_dec_cpu_ms` is the CPU time of the calling thread: with one torch thread (the
default, as in a call) all the work runs there, so it shows what the code costs even when
other processes take the CPU away for part of a call.

The baseline is the codec as `NeuralCodec` ships it: the eager float32 modules (BatchNorm
unfolded, NCHW). Each backend's calls are interleaved with the baseline's, call for call, so
load from other processes hits both alike; `speedup` is the baseline's median encode + decode
over the backend's, from the same run. With --quality (default on when a non-baseline backend
runs), `streamer.backends.compare` reports each backend's agreement with the baseline at 224
on --quality-frames clip frames: code agreement, decoder PSNR and the whole-path PSNR drop.

    python -m streamer.bench codec [--backend eager|all|NAME[,NAME]] [--preset lite[,...]|all]
        [--sizes 128,224,256] [--batch 1,8] [--repeats 20] [--threads 1] [--weights default]
        [--quality-clips sample|PATH[,PATH]] [--no-quality] [--json]

The default (`--backend eager`) answers "encode, decode, pack and unpack median ms per preset and
size (128, 224, 256)" for the shipped model in well under 90 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from ..codec import NeuralCodec
from ..codec.codec import to_uint8
from ..codec.presets import PRESETS
from ..errors import StreamerError, WeightsError
from . import cpu_name

BASELINE = "baseline"
DEFAULT_SIZES = (128, 224, 256)
DEFAULT_BATCHES = (1, 8)


# -- setup -------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = cpu_name()
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def load_codec(preset: str, weights: str) -> tuple[NeuralCodec, str]:
    """The shipped weights when they are of `preset`, else random weights of that preset."""
    try:
        codec = NeuralCodec.load(weights)
        if codec.cfg.preset == preset:
            return codec, weights
    except WeightsError:
        pass
    return NeuralCodec.untrained(preset), "untrained"


def clip_frames(size: int, count: int) -> np.ndarray:
    from ..backends.calibration import sample_frames

    frames = sample_frames(size, None)
    idx = np.linspace(0, len(frames) - 1, count).round().astype(int) if count < len(frames) else np.arange(count) % len(frames)
    return np.ascontiguousarray(frames[idx])


def quality_frames(clips: str, count: int) -> np.ndarray:
    """224 frames for --quality: `count` frames of the sample clip, or `count` per clip of a list."""
    if clips == "sample":
        return clip_frames(224, count)
    from ..backends.calibration import clip_set

    return clip_set(parse_list(clips, str), 224, count)


# -- timing ------------------------------------------------------------------------------------

class Subject:
    """One codec under test and the four operations, timed per call."""

    def __init__(self, name: str, codec: NeuralCodec) -> None:
        self.name, self.codec = name, codec
        self.times: dict[str, list[float]] = {"encode": [], "decode": [], "enc_dec": [], "enc_dec_cpu": []}
        self.first_call_s = 0.0

    def encode(self, frames: np.ndarray) -> list[Any]:
        return self.codec.encode_batch(frames)

    def decode(self, qs: list[Any]) -> np.ndarray:
        with torch.inference_mode():
            return to_uint8(self.codec.decoder(latents_batch(self.codec, qs)))

    def step(self, frames: np.ndarray, record: bool) -> None:
        c0 = time.thread_time()
        t0 = time.perf_counter()
        qs = self.encode(frames)
        t2 = t1 = time.perf_counter()
        self.decode(qs)
        t3 = time.perf_counter()
        c3 = time.thread_time()
        if record:
            self.times["encode"].append(t1 - t0)
            self.times["decode"].append(t3 - t2)
            self.times["enc_dec"].append(t1 - t0 + t3 - t2)
            self.times["enc_dec_cpu"].append(c3 - c0)


def latents_batch(codec: NeuralCodec, qs: list[Any]) -> torch.Tensor:
    """Each frame's codes dequantized as its receiver does (`NeuralCodec.latents`), stacked."""
    return torch.cat([codec.latents(q.codes, q.lo, q.hi, q.level) for q in qs])


def stats(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts) * 1e3
    return {"median": round(float(np.median(a)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


def time_pack(codec: NeuralCodec, frames: np.ndarray, repeats: int) -> tuple[dict[str, float], dict[str, float], int]:
    qs = codec.encode_batch(frames)
    packets = [codec.pack(q, i, 0) for i, q in enumerate(qs)]
    pack_t, unpack_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, q in enumerate(qs):
            codec.pack(q, i, 0)
        t1 = time.perf_counter()
        for ps in packets:
            for p in ps:
                codec.unpack(p)
        t2 = time.perf_counter()
        pack_t.append(t1 - t0)
        unpack_t.append(t2 - t1)
    return stats(pack_t), stats(unpack_t), sum(len(p) for ps in packets for p in ps) // len(packets)


def time_inter_pack(codec: NeuralCodec, size: int, repeats: int, count: int = 9) -> dict[str, Any] | None:
    """The P-frame path after the encoder (see the module docstring), per frame: None when the
    model has no residual tables."""
    if not codec.codes_p_frames:
        return None
    from ..backends.calibration import sample_frames
    from ..codec.decision import keep_reference, unrounded_codes
    from ..codec.residual import residuals
    from ..session import DEFAULT_DECISION_THRESHOLD
    from ..transport import SLICE_BYTES

    level = codec.cfg.quantizer.level
    frames = sample_frames(size, None)[:count]
    encoded = [codec.encode_with_latents(f, level) for f in frames]  # consecutive: a talking head
    mode_step = codec.cfg.quantizer.mode == "step"

    def pack_all() -> list[list[bytes]]:
        out, prediction = [], encoded[0][1].codes
        for i, (latents, q) in enumerate(encoded[1:], start=1):
            codes = q.codes
            if mode_step:
                codes = keep_reference(codes, unrounded_codes(codec.quantizer, latents, level), prediction,
                                       DEFAULT_DECISION_THRESHOLD)
            out.append(codec.pack_inter(q, residuals(codes, prediction), i, 0, SLICE_BYTES, i - 1))
            prediction = codes
        return out

    packets = pack_all()
    pack_t, unpack_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pack_all()
        t1 = time.perf_counter()
        for ps in packets:
            for p in ps:
                codec.unpack(p)
        t2 = time.perf_counter()
        pack_t.append((t1 - t0) / len(packets))
        unpack_t.append((t2 - t1) / len(packets))
    return {"p_pack_ms": stats(pack_t), "p_unpack_ms": stats(unpack_t),
            "p_packet_bytes": sum(len(p) for ps in packets for p in ps) // len(packets)}


def time_learned(codec: NeuralCodec, size: int, repeats: int, count: int = 9) -> dict[str, Any]:
    """The learned P-frame path per frame (see the module docstring); {} when no shipped coder
    fits this model."""
    from ..backends.calibration import sample_frames
    from ..codec import conditional as cond
    from ..codec.codec import to_tensor

    model = cond.shipped_for(codec.model_id)
    if model is None:
        return {}
    level = min(codec.cfg.quantizer.level, model.levels - 1)
    frames = sample_frames(size, None)[:count]
    with torch.inference_mode():
        ys = [codec.encoder(to_tensor(f[None])) for f in frames[1:]]
    first, _, step = codec.quantizer.grid(level)
    ref0 = cond.intra_reference(codec.encode(frames[0], level).codes, first, step)  # after an I-frame
    coder = cond.gaussian_coder()
    enc_t, dec_t, sizes, identical = [], [], [], True
    for _ in range(max(1, repeats // 4)):
        ref = receiver = ref0
        for y in ys:
            t0 = time.perf_counter()
            payload, ref = cond.encode_frame(model, coder, y, ref, level, cond.SENDER_DEADZONE)
            t1 = time.perf_counter()
            receiver = cond.decode_frame(model, coder, payload, receiver, level)
            t2 = time.perf_counter()
            identical = identical and torch.equal(receiver, ref)
            enc_t.append(t1 - t0)
            dec_t.append(t2 - t1)
            sizes.append(len(payload))
    return {"learned_p_encode_ms": stats(enc_t), "learned_p_decode_ms": stats(dec_t),
            "learned_p_bytes": int(np.median(sizes)), "learned_p_level": level,
            "learned_p_references_identical": identical}


def measure(subjects: list[Subject], frames: np.ndarray, repeats: int, warmup: int,
            budget_s: float = float("inf")) -> None:
    """Warm up each subject, then `repeats` round-robin calls (fewer, but at least 5, when a cell
    passes `budget_s`: big presets on a small CPU would otherwise take minutes)."""
    for s in subjects:
        t = time.perf_counter()
        s.step(frames, record=False)  # first call: compiles for this shape where a backend compiles
        s.first_call_s = time.perf_counter() - t
        for _ in range(max(0, warmup - 1)):
            s.step(frames, record=False)
    start = time.perf_counter()
    for i in range(repeats):  # round-robin: load from other processes hits every subject alike
        for s in subjects:
            s.step(frames, record=True)
        if i + 1 >= 5 and time.perf_counter() - start > budget_s:
            break


# -- run ---------------------------------------------------------------------------------------

def parse_list(text: str, conv: Callable[[str], Any]) -> list[Any]:
    return [conv(t) for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..backends import BACKENDS, BackendError, apply_backend, available_backends, compare, resolve_backend

    avail = available_backends("cpu" if args.device == "cpu" else None)
    if args.backend == "all":
        wanted = [b for b in BACKENDS if avail[b] is None]
        skipped = {b: r for b, r in avail.items() if r is not None}
    else:
        wanted, skipped = [], {}
        for b in parse_list(args.backend, str):
            try:
                wanted.append(resolve_backend(b, args.device))
            except BackendError as e:
                skipped[b] = str(e)
    presets = list(PRESETS) if args.preset == "all" else parse_list(args.preset, str)
    rows: list[dict[str, Any]] = []
    quality: list[dict[str, Any]] = []
    build_s: dict[str, float] = {}
    for preset in presets:
        base, weights = load_codec(preset, args.weights)
        subjects = [Subject(BASELINE, base)]
        for b in wanted:
            # a copy, not a second load: the weights file may be replaced (by training) meanwhile
            codec = copy.deepcopy(base)
            t = time.perf_counter()
            try:
                apply_backend(codec, b, device=args.device)
            except BackendError as e:
                skipped[b] = str(e)
                continue
            build_s[f"{preset}/{b}"] = round(time.perf_counter() - t, 2)
            subjects.append(Subject(b, codec))
        for size in args.sizes:
            inter = (time_inter_pack(base, size, args.repeats) or {}) | time_learned(base, size, args.repeats)
            for batch in args.batch:
                frames = clip_frames(size, batch)
                for s in subjects:
                    s.times = {k: [] for k in s.times}
                measure(subjects, frames, args.repeats, args.warmup, args.cell_budget)
                pack, unpack, packet_bytes = time_pack(base, frames, args.repeats)
                ref = float(np.median(subjects[0].times["enc_dec"]))
                ref_cpu = float(np.median(subjects[0].times["enc_dec_cpu"]))
                for s in subjects:
                    ed = float(np.median(s.times["enc_dec"]))
                    ed_cpu = float(np.median(s.times["enc_dec_cpu"]))
                    rows.append({
                        "preset": preset, "weights": weights, "backend": s.name, "size": size, "batch": batch,
                        "encode_ms": stats(s.times["encode"]), "decode_ms": stats(s.times["decode"]),
                        "enc_dec_ms": stats(s.times["enc_dec"]), "enc_dec_cpu_ms": stats(s.times["enc_dec_cpu"]),
                        "pack_ms": pack, "unpack_ms": unpack,
                        "per_frame_enc_dec_ms": round(ed * 1e3 / batch, 3),
                        "speedup": round(ref / ed, 3), "cpu_speedup": round(ref_cpu / max(ed_cpu, 1e-9), 3),
                        "first_call_s": round(s.first_call_s, 2),
                        "repeats": len(s.times["enc_dec"]),
                        "packet_bytes": packet_bytes, **inter,
                    })
        if args.quality and len(subjects) > 1:
            frames = quality_frames(args.quality_clips, args.quality_frames)
            for s in subjects[1:]:
                a = compare(s.codec, frames, batch=max(args.batch))
                quality.append({"preset": preset, "weights": weights, **a.to_dict()})
    return {"bench": "codec", "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "backends": wanted, "skipped": skipped, "build_s": build_s,
            "rows": rows, "quality": quality, "quality_clips": args.quality_clips}


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [f"codec benchmark: {m['cpu']} ({m['cores']} cores, {m['cpu_capability']}), torch {r['torch']}, "
           f"{r['threads']} threads, load {m.get('loadavg_at_start')}, {r['repeats']} repeats; ms per call "
           f"(cpu: the calling thread's CPU ms for encode + decode)"]
    hdr = (f"{'preset':16s} {'weights':9s} {'backend':9s} {'size':>4s} {'batch':>5s} {'encode':>8s} {'p99':>8s} "
           f"{'decode':>8s} {'p99':>8s} {'enc+dec':>8s} {'/frame':>7s} {'speedup':>7s} {'cpu':>7s} {'speedup':>7s} "
           f"{'pack':>6s} {'unpack':>6s} {'p_pack':>6s} {'p_unpk':>6s} {'p_B':>5s}")
    out += [hdr, "-" * len(hdr)]
    for row in r["rows"]:
        out.append(f"{row['preset']:16s} {row['weights'][:9]:9s} {row['backend']:9s} {row['size']:4d} {row['batch']:5d} "
                   f"{row['encode_ms']['median']:8.2f} {row['encode_ms']['p99']:8.2f} {row['decode_ms']['median']:8.2f} "
                   f"{row['decode_ms']['p99']:8.2f} {row['enc_dec_ms']['median']:8.2f} {row['per_frame_enc_dec_ms']:7.2f} "
                   f"{row['speedup']:6.2f}x {row['enc_dec_cpu_ms']['median']:7.2f} {row['cpu_speedup']:6.2f}x "
                   f"{row['pack_ms']['median']:6.3f} {row['unpack_ms']['median']:6.3f} "
                   + (f"{row['p_pack_ms']['median']:6.3f} {row['p_unpack_ms']['median']:6.3f} {row['p_packet_bytes']:5d}"
                      if "p_pack_ms" in row else f"{'-':>6s} {'-':>6s} {'-':>5s}"))
    for row in r["rows"]:
        if "learned_p_encode_ms" in row and row["batch"] == r["rows"][0]["batch"] and row["backend"] == BASELINE:
            out.append(f"learned P-frames, {row['preset']} at {row['size']}, level {row['learned_p_level']}: "
                       f"encode_frame {row['learned_p_encode_ms']['median']:.2f} ms, decode_frame "
                       f"{row['learned_p_decode_ms']['median']:.2f} ms (latents to latents, range coding "
                       f"included), {row['learned_p_bytes']} bytes")
    if r["build_s"]:
        out.append("backend build s: " + ", ".join(f"{k} {v}" for k, v in r["build_s"].items()))
    for q in r["quality"]:
        out.append(f"quality {q['preset']} ({q['weights']}) {q['backend']}: codes equal {q['codes_equal']:.2%}, "
                   f"within 1 {q['codes_within_1']:.2%}, decoder PSNR vs eager {q['decoder_psnr']:.1f} dB, "
                   f"path PSNR {q['psnr_backend']:.2f} dB vs eager {q['psnr_reference']:.2f} dB "
                   f"(drop {q['psnr_drop']:+.3f} dB), {q['frames']} frames at 224 from {r['quality_clips']}")
    for b, why in r["skipped"].items():
        out.append(f"skipped {b}: {why}")
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamer.bench codec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="eager",
                    help="all | comma list of auto,eager,compile,int8,tensorrt (default: eager); "
                         "the plain eager float32 baseline always runs beside them")
    ap.add_argument("--preset", default="lite", help=f"comma list or 'all' ({', '.join(PRESETS)}); default lite")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="frame sides (default 128,224,256)")
    ap.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCHES)), help="batch sizes (default 1,8)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per cell (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per cell first (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1, as the sender and receiver run: on a small "
                         "shared CPU more intra-op threads than free cores spin and slow every backend down)")
    ap.add_argument("--weights", default="default", help="weights for the lite preset (default: the shipped model)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    ap.add_argument("--quality", dest="quality", action="store_true", default=True,
                    help="report each backend's agreement with eager float32 (default)")
    ap.add_argument("--no-quality", dest="quality", action="store_false")
    ap.add_argument("--quality-frames", type=int, default=16, help="frames per clip for --quality (default 16)")
    ap.add_argument("--quality-clips", default="sample",
                    help="'sample' (the bundled clip, default) or comma list of clips / folders of clips; "
                         "the int8 backend calibrates on the sample clip, so other clips measure it fairly")
    ap.add_argument("--cell-budget", type=float, default=4.0,
                    help="seconds of timed calls per cell before stopping early (at least 5 calls; default 4)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    try:
        args.sizes = parse_list(args.sizes, int)
        args.batch = parse_list(args.batch, int)
    except ValueError:
        ap.error("--sizes and --batch take comma-separated integers")
    if not args.sizes or not args.batch or min(args.sizes + args.batch) < 1 or any(s % 8 for s in args.sizes):
        ap.error("--sizes must be positive multiples of 8 and --batch positive")
    if args.repeats < 1 or args.warmup < 1 or args.quality_frames < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--repeats, --warmup, --quality-frames and --threads must be >= 1")
    if args.preset != "all":
        for p in parse_list(args.preset, str):
            if p not in PRESETS:
                ap.error(f"unknown preset {p!r}; known: {', '.join(PRESETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        r = run(args)
    except StreamerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
