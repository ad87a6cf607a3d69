"""Rate-distortion evaluation of a trained codec against JPEG, WebP, JPEG 2000 and x264.

    python -m training.evaluate --weights default --data ../shared/data/val --out training/results [--json]

Val frames are framed as the call frames them (`streamer.antialias`: centre square of side
size*k, Gaussian anti-alias downsampling by 1/k; sources smaller than the model keep their
largest centre square that is a multiple of 8): `--frames-per-clip` frames spread over each
clip, plus every still. Quality is measured on 8-bit outputs: PSNR (the mean of per-frame
PSNRs and the PSNR of the mean MSE, named apart) and MS-SSIM. Rates are real: the neural codec's
bits per pixel come from the bytes of its packets (`NeuralCodec.packets`, header included).

- neural codec: a step-mode model at each of its quantizer levels (its default first; JPEG is
  also matched to every level); a fixed-mode model at its trained bit depth and, by
  re-quantizing the same latents with fewer bits (no retraining), lower operating points.
- JPEG / WebP / JPEG 2000 (Pillow): per frame, the quality setting whose size is closest to the
  neural codec's bpp (searched), plus a few fixed settings for the RD curve.
- x264 (PyAV libx264, tune=zerolatency): each val clip, all its frames framed as above, encoded
  as video at its frame rate with the bitrate matched to the neural codec (bpp x pixels x fps)
  and at call rates 0.1-0.7 Mbit/s; measured on the same sampled frames.

Writes `<out>/rd.json` (the table) and `<out>/rd.png` (the plot).

`--video` is the other evaluation: whole clips at call bitrates (`--kbps`) through the neural
codec, x264 and VP8, with BD-rates (`training/video_eval.py`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from streamer.backends import add_backend_arguments, apply_backend
from streamer.codec import NeuralCodec
from streamer.codec.bitstream import compression_ratio
from streamer.errors import StreamerError
from streamer.roundtrip import decode_packets

from . import data as D
from . import video_eval
from .config import check_media, require_extra
from .metrics import ms_ssim, mse_uint8, summarize_psnr

X264_RATES_KBPS = (100, 300, 500, 700)
JPEG_QUALITIES = (10, 25, 50, 75, 90)
WEBP_QUALITIES = (10, 25, 50, 75, 90)
J2K_RATIOS = (80, 40, 20, 10)  # compression ratios (24 bpp / ratio)


@dataclass
class Clip:
    name: str
    fps: float
    frames: list[np.ndarray]  # every frame, framed (videos), or the one still
    sampled: list[int]  # indices of the frames measured


@dataclass
class Result:
    codec: str
    point: str
    bits: list[float] = field(default_factory=list)  # per frame
    pixels: list[int] = field(default_factory=list)
    mses: list[float] = field(default_factory=list)
    ssims: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, ref: np.ndarray, out: np.ndarray, nbytes: float) -> None:
        self.bits.append(nbytes * 8)
        self.pixels.append(ref.shape[0] * ref.shape[1])
        self.mses.append(mse_uint8(ref, out))
        self.ssims.append(float(ms_ssim(ref, out)[0]))

    def summary(self) -> dict:
        bpp = float(np.sum(self.bits) / np.sum(self.pixels))
        return {"codec": self.codec, "point": self.point, "frames": len(self.mses), "bpp": bpp,
                "compression_ratio": 24.0 / bpp, **summarize_psnr(self.mses),
                "ms_ssim": float(np.mean(self.ssims)), **self.extra}


# -- frames ---------------------------------------------------------------------------------------

def load_clips(root: Path, size: int, per_clip: int, cache_dir: Path | None = Path("cache/eval")) -> list[Clip]:
    """Every source under root, framed at `size` (videos: all frames, for x264), `per_clip` of
    them sampled. Framed clips are cached as uint8 .npy (plus their fps) in cache_dir."""
    clips = []
    for path in D.folder_sources(root):
        key = None
        if cache_dir is not None:
            st = path.stat()
            import hashlib
            key = Path(cache_dir) / f"{path.stem[:40]}-{hashlib.sha1(f'{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{size}'.encode()).hexdigest()[:12]}"
            if key.with_suffix(".npy").exists() and key.with_suffix(".fps").exists():
                frames = list(np.load(key.with_suffix(".npy")))
                fps = float(key.with_suffix(".fps").read_text())
                sampled = sorted(set(np.linspace(0, len(frames) - 1, num=min(per_clip, len(frames))).round().astype(int).tolist()))
                clips.append(Clip(path.name, fps, frames, sampled))
                continue
        try:
            if D.is_image(path):
                frames = [D.frame_to_square(D.read_image(path), size)]
                fps = 0.0
            else:
                import av
                with av.open(str(path)) as c:
                    s = c.streams.video[0]
                    fps = float(s.average_rate) if s.average_rate else D.RAW_STREAM_FPS
                    if path.suffix.lower() in (".264", ".h264"):
                        fps = D.RAW_STREAM_FPS
                    s.thread_type = "AUTO"
                    frames = [D.frame_to_square(f.to_ndarray(format="rgb24"), size) for f in c.decode(s)]
                side = min(f.shape[0] for f in frames)
                frames = [f if f.shape[0] == side else D.frame_to_square(f, side) for f in frames]
        except Exception as e:  # report and skip, never fatal
            print(f"skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if not frames:
            continue
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            np.save(key.with_suffix(".tmp.npy"), np.stack(frames))
            key.with_suffix(".tmp.npy").replace(key.with_suffix(".npy"))
            key.with_suffix(".fps").write_text(repr(fps))
        sampled = sorted(set(np.linspace(0, len(frames) - 1, num=min(per_clip, len(frames))).round().astype(int).tolist()))
        clips.append(Clip(path.name, fps, frames, sampled))
    return clips


# -- the neural codec -----------------------------------------------------------------------------

def neural_points(codec: NeuralCodec, extra_bits: tuple[int, ...]) -> list[tuple[str, NeuralCodec, int | None]]:
    """(label, codec, level) of each operating point, the model's default first."""
    if codec.cfg.quantizer.mode == "step":
        steps, default = codec.cfg.quantizer.steps, codec.cfg.quantizer.level
        order = [default] + [lv for lv in range(len(steps)) if lv != default]
        return [(f"level {lv} (step {steps[lv]:g})" + (", default" if lv == default else ""), codec, lv)
                for lv in order]
    from streamer.codec.quantizer import QuantizerConfig
    from streamer.codec.weights import CodecConfig

    points: list[tuple[str, NeuralCodec, int | None]] = [(f"{codec.bits} bit", codec, None)]
    for bits in (b for b in extra_bits if b < codec.bits):
        qc = QuantizerConfig.from_dict({**codec.cfg.quantizer.to_dict(), "bits": bits})
        cfg = CodecConfig(codec.cfg.preset, codec.cfg.model, qc, codec.cfg.frame_size, {})
        c = NeuralCodec(cfg, codec.model, codec.model_id ^ bits, name=f"{codec.name}-{bits}bit")
        c.encoder, c.decoder, c.backend = codec.encoder, codec.decoder, codec.backend  # same runtime
        points.append((f"{bits} bit (re-quantized, not retrained)", c, None))
    return points


def packet_roundtrip(codec: NeuralCodec, frame: np.ndarray, n: int, level: int | None) -> tuple[int, np.ndarray]:
    """(bytes on the wire, decoded frame): encode, pack, unpack every slice, decode."""
    pkts = codec.packets(frame, n, 0, level=level)
    return sum(len(p) for p in pkts), decode_packets(codec, pkts)


# -- image codecs ---------------------------------------------------------------------------------

def pil_encode(frame: np.ndarray, fmt: str, q: float) -> tuple[bytes, np.ndarray]:
    from PIL import Image

    im = Image.fromarray(frame)
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=int(q))  # Pillow's default 4:2:0 chroma subsampling
    elif fmt == "WEBP":
        im.save(buf, "WEBP", quality=int(q), method=4)
    elif fmt == "JPEG2000":
        im.save(buf, "JPEG2000", quality_mode="rates", quality_layers=[float(q)], irreversible=True)
    else:
        raise ValueError(fmt)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as dec:
        out = np.asarray(dec.convert("RGB"))
    return data, out


def matched_quality(frame: np.ndarray, fmt: str, target_bytes: float) -> tuple[bytes, np.ndarray, float]:
    """The setting whose output size is closest to target_bytes: bisection over quality (JPEG,
    WebP: integers 1..100) or over the compression ratio (JPEG 2000)."""
    if fmt == "JPEG2000":
        guess = frame.shape[0] * frame.shape[1] * 3 / max(target_bytes, 1.0)  # the ratio asked for
        lo, hi = max(1.0, guess / 2.5), guess * 2.5  # size falls as the ratio rises
        best = None
        for _ in range(8):
            mid = (lo * hi) ** 0.5
            data, out = pil_encode(frame, fmt, mid)
            if best is None or abs(len(data) - target_bytes) < abs(len(best[0]) - target_bytes):
                best = (data, out, mid)
            if len(data) > target_bytes:
                lo = mid
            else:
                hi = mid
        return best
    lo, hi = 1, 100
    cache: dict[int, tuple[bytes, np.ndarray]] = {}

    def enc(q: int) -> tuple[bytes, np.ndarray]:
        if q not in cache:
            cache[q] = pil_encode(frame, fmt, q)
        return cache[q]

    while lo < hi:  # largest q with size <= target
        mid = (lo + hi + 1) // 2
        if len(enc(mid)[0]) <= target_bytes:
            lo = mid
        else:
            hi = mid - 1
    cands = [q for q in (lo, lo + 1) if q <= 100]
    q = min(cands, key=lambda c: abs(len(enc(c)[0]) - target_bytes))
    return (*enc(q), float(q))


# -- x264 -----------------------------------------------------------------------------------------

def x264_roundtrip(frames: list[np.ndarray], fps: float, kbps: float, preset: str) -> tuple[list[np.ndarray], int]:
    """Encode frames as one H.264 stream (libx264, tune=zerolatency, ABR at kbps) and decode it.
    Returns the decoded RGB frames and the stream's size in bytes."""
    import av
    from fractions import Fraction

    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    fps_frac = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format="h264") as out:
        s = out.add_stream("libx264", rate=fps_frac)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.bit_rate = int(kbps * 1000)
        s.options = {"preset": preset, "tune": "zerolatency",
                     "x264-params": f"vbv-maxrate={int(kbps)}:vbv-bufsize={int(kbps)}"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for pkt in s.encode(vf):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    data = buf.getvalue()
    with av.open(io.BytesIO(data), format="h264") as c:
        dec = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return dec, len(data)


# -- main -----------------------------------------------------------------------------------------

def evaluate(weights: str, data_dir: Path, per_clip: int = 8, x264_preset: str = "veryfast",
             extra_bits: tuple[int, ...] = (5, 4), log: Callable[[str], None] = print, threads: int = 1,
             backend: str = "eager", precision: str | None = None, cache_dir: Path | None = None) -> dict:
    t0 = time.time()
    torch.set_num_threads(threads)  # 1: on a shared 2-core machine more threads spin and run slower
    codec = apply_backend(NeuralCodec.load(weights), backend, precision=precision, cache_dir=cache_dir)
    size = codec.frame_size
    clips = load_clips(data_dir, size, per_clip)
    if not clips:
        raise StreamerError(f"no readable video or image under {data_dir} (each is listed above as skipped)")
    measured = [(c, i) for c in clips for i in c.sampled]
    log(f"{len(clips)} sources, {len(measured)} measured frames at {size} px ({time.time() - t0:.0f} s)")
    results: list[Result] = []

    # the neural codec: step mode at each of its levels (default first), fixed mode at its own bit
    # depth and re-quantized to fewer bits. Every point goes through real packets (range coding
    # included) and back through `unpack`.
    neural_bytes: list[int] = []
    level_bytes: dict[str, list[int]] = {}
    for label, c, level in neural_points(codec, extra_bits):
        r = Result("neural", label)
        sizes = []
        for n, (clip, i) in enumerate(measured):
            nbytes, out = packet_roundtrip(c, clip.frames[i], n, level)
            r.add(clip.frames[i], out, nbytes)
            sizes.append(nbytes)
        if not neural_bytes:  # the default operating point: what the image codecs are matched to
            neural_bytes = sizes
            r.extra["packet_bytes_224"] = int(np.median(sizes))
            r.extra["default"] = True
        if level is not None:
            r.extra.update(level=level, step=codec.cfg.quantizer.steps[level])
            level_bytes[label] = sizes
        results.append(r)
        log(f"neural {label}: {r.summary()['psnr_mean_of_frames']:.2f} dB at {r.summary()['bpp']:.3f} bpp")
    target_bpp = results[0].summary()["bpp"]

    # JPEG matched to every other step-mode level too: the comparison at each rate, not one
    for label, sizes in list(level_bytes.items())[1:]:
        r = Result("jpeg", f"matched to neural {label}")
        for (clip, i), nb in zip(measured, sizes):
            data, out, _ = matched_quality(clip.frames[i], "JPEG", nb)
            r.add(clip.frames[i], out, len(data))
        results.append(r)

    # image codecs: matched to the neural codec's bytes frame by frame, then fixed settings
    for name, fmt, fixed in (("jpeg", "JPEG", JPEG_QUALITIES), ("webp", "WEBP", WEBP_QUALITIES),
                             ("jpeg2000", "JPEG2000", J2K_RATIOS)):
        r = Result(name, "matched bpp")
        qs = []
        for (clip, i), nb in zip(measured, neural_bytes):
            data, out, q = matched_quality(clip.frames[i], fmt, nb)
            r.add(clip.frames[i], out, len(data))
            qs.append(q)
        r.extra["setting_median"] = float(np.median(qs))
        r.extra["setting"] = "compression ratio" if fmt == "JPEG2000" else "quality"
        results.append(r)
        log(f"{name} matched: {r.summary()['psnr_mean_of_frames']:.2f} dB at {r.summary()['bpp']:.3f} bpp")
        for q in fixed:
            r = Result(name, f"ratio {q}" if fmt == "JPEG2000" else f"quality {q}")
            for clip, i in measured:
                data, out = pil_encode(clip.frames[i], fmt, q)
                r.add(clip.frames[i], out, len(data))
            results.append(r)
    log(f"image codecs done ({time.time() - t0:.0f} s)")

    # x264: video clips only, as video at their frame rate
    vids = [c for c in clips if c.fps > 0 and len(c.frames) > 1]
    if vids:
        vid_frames = [(c, i) for c in vids for i in c.sampled]
        sub = Result("neural", "video clips only")  # the neural codec on the same frames, for reference
        for c, i in vid_frames:
            pk = codec.packets(c.frames[i], 0, 0)
            sub.add(c.frames[i], codec.decode_packet(pk[0])[1], sum(len(p) for p in pk))
        sub.extra["subset"] = "video"
        results.append(sub)
        for label, rate in [("matched bpp", None)] + [(f"{k} kbps", k) for k in X264_RATES_KBPS]:
            r = Result("x264", label)
            kbps_used = []
            for c in vids:
                h, w = c.frames[0].shape[:2]
                kbps = rate if rate is not None else target_bpp * h * w * c.fps / 1000
                dec, nbytes = x264_roundtrip(c.frames, c.fps, kbps, x264_preset)
                per_frame = nbytes / len(c.frames)  # the stream's average bytes per frame
                for i in c.sampled:
                    if i < len(dec):
                        r.add(c.frames[i], dec[i], per_frame)
                kbps_used.append(kbps)
            r.extra.update(preset=x264_preset, tune="zerolatency", target_kbps_median=float(np.median(kbps_used)),
                           subset="video")
            results.append(r)
            log(f"x264 {label}: {r.summary()['psnr_mean_of_frames']:.2f} dB at {r.summary()['bpp']:.3f} bpp")

    table = [r.summary() for r in results]
    return {"weights": str(weights), "model_id": f"{codec.model_id:08x}", "preset": codec.cfg.preset,
            "backend": codec.backend,
            "latent_channels": codec.cfg.model.latent_channels, "bits": codec.bits,
            "quantizer": (f"step {codec.cfg.quantizer.steps[codec.cfg.quantizer.level]:g}, range-coded"
                          if codec.cfg.quantizer.mode == "step" else f"{codec.bits} bit {codec.cfg.quantizer.mode}"),
            "frame_size": size, "data": str(data_dir), "frames_per_clip": per_clip,
            "sources": len(clips), "frames_measured": len(measured),
            "compression_ratio_packet": compression_ratio(results[0].extra.get("packet_bytes_224", 0) or 1, size, size),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU, torch {torch.__version__}",
            "seconds": round(time.time() - t0, 1), "results": table}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = [r for r in report["results"] if r.get("subset") != "video" or r["codec"] == "x264"]
    styles = {"neural": "o-", "jpeg": "s-", "webp": "^-", "jpeg2000": "d-", "x264": "v-"}
    for codec in ("neural", "jpeg", "webp", "jpeg2000", "x264"):
        pts = sorted([r for r in rows if r["codec"] == codec], key=lambda r: r["bpp"])
        if not pts:
            continue
        label = codec + (" (video clips)" if codec == "x264" else "")
        for ax, key in zip(axes, ("psnr_mean_of_frames", "ms_ssim")):
            ax.plot([r["bpp"] for r in pts], [r[key] for r in pts], styles[codec], label=label, ms=4)
            for r in pts:
                if r["point"] == "matched bpp" or r.get("default"):
                    ax.plot(r["bpp"], r[key], "o", mfc="none", mec="k", ms=10)
    for ax, ylabel in zip(axes, ("PSNR, mean of frames (dB)", "MS-SSIM")):
        ax.set_xlabel("bits per pixel (real packet / file sizes)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{report['weights']} ({report['preset']}, {report['latent_channels']} ch, {report['quantizer']}) "
                 f"on {Path(report['data']).name}: {report['frames_measured']} frames at {report['frame_size']} px; "
                 "circled: matched to the neural codec", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(report: dict) -> str:
    lines = ["| codec | point | bpp | ratio | PSNR mean of frames (dB) | PSNR of mean MSE (dB) | MS-SSIM | frames |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        lines.append(f"| {r['codec']}{' (video)' if r.get('subset') == 'video' else ''} | {r['point']} | {r['bpp']:.3f} | "
                     f"{r['compression_ratio']:.1f} | {r['psnr_mean_of_frames']:.2f} | {r['psnr_of_mean_mse']:.2f} | "
                     f"{r['ms_ssim']:.4f} | {r['frames']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rate-distortion evaluation against JPEG, WebP, JPEG 2000 and x264")
    ap.add_argument("--weights", default="default", help="packaged name (default) or path to .json/.safetensors")
    ap.add_argument("--data", required=True, help="folder of val videos/images (e.g. ../shared/data/val)")
    ap.add_argument("--out", help="write rd.json, rd.md and rd.png here")
    ap.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    ap.add_argument("--frames-per-clip", type=int, default=8)
    ap.add_argument("--x264-preset", default="veryfast")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_backend_arguments(ap, default="eager")
    ap.add_argument("--video", action="store_true",
                    help="video RD at call bitrates against x264 and VP8 (training/video_eval.py)")
    video_eval.add_arguments(ap)
    args = ap.parse_args(argv)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    if args.video:
        return video_eval.main(args, argv, log)
    try:
        check_media(args.data, "--data")  # mistakes up front, before minutes of work
        if args.out:
            require_extra("matplotlib")  # the plot
        report = evaluate(args.weights, Path(args.data), args.frames_per_clip, args.x264_preset, log=log,
                          threads=args.threads, backend=args.backend, precision=args.backend_precision,
                          cache_dir=args.backend_cache)
    except StreamerError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rd.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "rd.md").write_text(markdown_table(report) + "\n")
        plot(report, out / "rd.png")
        log(f"wrote {out / 'rd.json'}, {out / 'rd.md'}, {out / 'rd.png'}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
