"""`python -m streamer.bench antialias`: the anti-alias study's table, on real frames.

Decodes --frames frames of the bundled sample clip with PyAV and, for FOMM's Gaussian
downsampler (`gaussian`, the fast module), its literal slow reference (`fomm_reference`) and
every alternative in `streamer.antialias.METHODS`, at scale 1/4 (FOMM's 256 → 64), reports:

* error against the `gaussian` output on the clip's frames: mean absolute pixel difference
  and PSNR, both on [0, 1] pixel values. (The study measured keypoint error; we have no
  keypoint detector, so this is a pixel-level stand-in.)
* median CPU time per frame (one (1,3,H,W) float32 frame per call, `time.perf_counter`,
  warm-up first, --repeats calls) at the clip's size and at 640×480, where the frames are
  bilinearly *resized* (upscaled) to 640×480 first. Calls are interleaved round-robin across
  methods so that load from other processes hits all methods alike; the order rotates every
  round (each method follows every other one equally often, so no method always inherits,
  say, the reference's 7.5 MB of freshly written buffers in cache), and before each timed
  call its input frame is read once, untimed, as a camera frame just converted for the
  encoder would be in cache.
* the speedup of `gaussian` over `fomm_reference` and its time as a multiple of `nearest`'s
  (the cheapest resampler) at 640×480 → 160×120, from the same run, and the largest
  |gaussian − reference| there (reference in float64).
* the sender's path, `downsample_frame` on HxWx3 uint8 frames (640×480 → 160×120), for
  `gaussian` and `nearest` (each method's own frame path: what the sender pays), timed the
  same way, with FOMM's reference applied to the same frames literally (bytes → planar
  float [0, 1] → `FommReference` → rounded bytes) as the frame path's reference.

    python -m streamer.bench antialias [--json] [--frames 16] [--repeats 30] [--threads T]
                                       [--clip PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from streamer.antialias import METHODS, FommReference, downsample, downsample_frame
from . import cpu_name

SAMPLE_CLIP = Path(__file__).resolve().parents[1] / "assets" / "sample.mpg"
SCALE = 0.25
BIG_SIZE = (480, 640)  # (H, W)
REFERENCE = "fomm_reference"
BASELINE = "gaussian"
NEAREST = "nearest"


def sample_clip() -> Path:
    """Default clip for the benchmark (the sample bundled with the package)."""
    return SAMPLE_CLIP


def load_frames(path: Path, n: int) -> np.ndarray:
    """First ``n`` frames of a video as an (n, H, W, 3) uint8 RGB array (fewer if it is short)."""
    import av  # only the benchmark needs PyAV here

    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= n:
                break
    if not frames:
        raise ValueError(f"no video frames could be decoded from {path}")
    return np.stack(frames)


def _machine() -> dict[str, Any]:
    cpu = cpu_name()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _methods(channels: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    ref = FommReference(channels, SCALE)  # kernel built once, as FOMM does
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {REFERENCE: ref}
    for name in METHODS:
        fns[name] = lambda x, name=name: downsample(x, SCALE, name)
    return fns


def _errors(outs: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    base = outs[BASELINE].double()
    res = {}
    for name, out in outs.items():
        diff = out.double() - base
        mse = diff.square().mean().item()
        psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
        res[name] = (diff.abs().mean().item(), psnr)
    return res


def _read(x: Any) -> None:
    """Bring a frame into cache (untimed), as the conversion that produced it would have."""
    if isinstance(x, torch.Tensor):
        x.sum()
    else:
        int(x.sum(dtype=np.uint64))


def _time(fns: dict[str, Callable[[Any], Any]], frames: list[Any],
          repeats: int) -> dict[str, float]:
    """Median ms per call for each function.

    Round-robin so background load is shared, in an order that rotates every round so each
    function follows each other one equally often; each timed call's input is read first.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: caches, allocator, thread pool
        fn(frames[0])
        fn(frames[-1])
    names = list(fns)
    for r in range(repeats):
        x = frames[r % len(frames)]
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            _read(x)
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def _reference_frame(ref: Callable[[torch.Tensor], torch.Tensor], frame: np.ndarray) -> np.ndarray:
    """FOMM's module applied to an HxWxC uint8 frame the literal way (the frame path's ref)."""
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].to(torch.float32).div_(255.0)
    y = ref(x)[0].mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(y.permute(1, 2, 0).numpy())


def run(clip: Path, n_frames: int, repeats: int) -> dict[str, Any]:
    rgb = load_frames(clip, n_frames)
    h, w = rgb.shape[1:3]
    batch = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    big = F.interpolate(batch, size=BIG_SIZE, mode="bilinear", align_corners=False).clamp_(0, 1)
    fns = _methods(batch.shape[1])
    big_u8 = [f.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
              for f in big]
    frame_fns: dict[str, Callable[[Any], Any]] = {
        REFERENCE: lambda a: _reference_frame(fns[REFERENCE], a)}
    frame_fns.update({name: (lambda a, name=name: downsample_frame(a, SCALE, name))
                      for name in (BASELINE, NEAREST)})
    with torch.inference_mode():
        errors = _errors({name: fn(batch) for name, fn in fns.items()})
        max_diff = (fns[BASELINE](big).double() - fns[REFERENCE](big.double())).abs().max().item()
        ms_clip = _time(fns, [f[None].contiguous() for f in batch], repeats)
        ms_big = _time(fns, [f[None].contiguous() for f in big], repeats)
        ms_frame = _time(frame_fns, big_u8, repeats)
    rows = []
    for name in fns:
        mae, psnr = errors[name]
        rows.append({
            "method": name,
            "mae": mae,
            "psnr_db": None if math.isinf(psnr) else psnr,  # identical → no finite PSNR
            "ms_clip": ms_clip[name],
            "ms_640x480": ms_big[name],
        })
    return {
        "machine": _machine(),
        "threads": torch.get_num_threads(),
        "clip": str(clip),
        "clip_size": [w, h],
        "frames": int(rgb.shape[0]),
        "repeats": repeats,
        "scale": SCALE,
        "error_metric": "mean |out - gaussian| and PSNR vs gaussian, [0,1] pixels, clip frames "
                        "(stand-in for the study's keypoint error: no keypoint detector here)",
        "big_frames": "clip frames bilinearly resized to 640x480",
        "rows": rows,
        "speedup_gaussian_vs_reference_640x480_quarter": ms_big[REFERENCE] / ms_big[BASELINE],
        "speedup_gaussian_vs_reference_clip_quarter": ms_clip[REFERENCE] / ms_clip[BASELINE],
        "ratio_gaussian_to_nearest_640x480_quarter": ms_big[BASELINE] / ms_big[NEAREST],
        "ratio_gaussian_to_nearest_clip_quarter": ms_clip[BASELINE] / ms_clip[NEAREST],
        "max_abs_diff_gaussian_vs_reference_640x480": max_diff,
        "frame_path": "downsample_frame on 640x480x3 uint8 frames (the clip frames above, "
                      "rounded) -> 160x120x3 uint8; fomm_reference = bytes -> planar float "
                      "-> FommReference -> rounded bytes",
        "frame_ms_640x480": ms_frame,
        "frame_ratio_gaussian_to_nearest_640x480": ms_frame[BASELINE] / ms_frame[NEAREST],
        "frame_speedup_gaussian_vs_reference_640x480": ms_frame[REFERENCE] / ms_frame[BASELINE],
    }


def report(r: dict[str, Any]) -> str:
    w, h = r["clip_size"]
    m = r["machine"]
    ref_big = next(row["ms_640x480"] for row in r["rows"] if row["method"] == REFERENCE)
    lines = [
        f"Anti-alias downsample at scale 1/{round(1 / r['scale'])}: {Path(r['clip']).name} "
        f"({w}x{h}), {r['frames']} frames; torch {m['torch']}, {r['threads']} threads, "
        f"{m['cpus']} cpus ({m['cpu']}), load avg {m.get('loadavg', ['?'])[0]}",
        "Error = vs the gaussian (FOMM) output, on [0,1] pixels: mean |diff| and PSNR",
        "  (the study measured keypoint error; there is no keypoint detector here).",
        f"Time = median ms per frame over {r['repeats']} interleaved calls (rotating order, "
        "input read before each call); 640x480 = clip frames bilinearly resized to 640x480.",
        "",
        f"{'method':<16}{'mean|diff|':>12}{'PSNR dB':>9}{f'ms {w}x{h}':>13}{'ms 640x480':>12}"
        f"{'x faster than ref':>19}",
    ]
    for row in r["rows"]:
        psnr = "inf" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        lines.append(
            f"{row['method']:<16}{row['mae']:>12.2e}{psnr:>9}{row['ms_clip']:>13.3f}"
            f"{row['ms_640x480']:>12.3f}{ref_big / row['ms_640x480']:>19.1f}"
        )
    lines += [
        "",
        f"speedup gaussian vs fomm_reference, 640x480 -> 1/4: "
        f"{r['speedup_gaussian_vs_reference_640x480_quarter']:.1f}x "
        f"({w}x{h}: {r['speedup_gaussian_vs_reference_clip_quarter']:.1f}x); "
        f"max |gaussian - reference| {r['max_abs_diff_gaussian_vs_reference_640x480']:.1e}",
        f"gaussian time / nearest time, 640x480 -> 1/4: "
        f"{r['ratio_gaussian_to_nearest_640x480_quarter']:.2f}x "
        f"({w}x{h}: {r['ratio_gaussian_to_nearest_clip_quarter']:.2f}x)",
        f"uint8 frame path (downsample_frame, 640x480x3): gaussian "
        f"{r['frame_ms_640x480'][BASELINE]:.3f} ms, nearest {r['frame_ms_640x480'][NEAREST]:.3f} ms "
        f"({r['frame_ratio_gaussian_to_nearest_640x480']:.2f}x), reference "
        f"{r['frame_ms_640x480'][REFERENCE]:.3f} ms "
        f"({r['frame_speedup_gaussian_vs_reference_640x480']:.1f}x faster)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamer.bench antialias",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--frames", type=int, default=16, help="frames decoded from the clip (16)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per method and size (30)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clip", type=Path, default=None, help=f"video to decode (default {SAMPLE_CLIP})")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--frames, --repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    clip = args.clip if args.clip is not None else sample_clip()
    if not clip.is_file():
        print(f"error: clip not found: {clip} (pass --clip PATH)", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    r = run(clip, args.frames, args.repeats)
    print(json.dumps(r) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
