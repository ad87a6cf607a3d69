"""Offline round trip: a clip through the whole codec path, without a network.

capture (file) → centre crop → anti-alias downsample → encode → quantize → pack → bytes →
unpack → decode. Writes a side-by-side video (original | decoded) and a JSON report
(PSNR, bits per pixel, compression ratio, timings).

    python -m streamer.roundtrip [--source PATH] [--weights NAME|PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import antialias
from .codec import NeuralCodec, bitstream
from .errors import StreamerError
from .metrics import mse, psnr_from_mse
from .video import SAMPLE_CLIP, VideoWriter, frame_rate, read_frames


def load_codec(weights: str) -> NeuralCodec:
    """The named weights (a missing file is a WeightsError: never a silent untrained model)."""
    return NeuralCodec.load(weights)


def prepare(frame: np.ndarray, size: int, method: str = "gaussian") -> np.ndarray:
    """Centre-crop a square of side size*k and downsample it by 1/k to size x size."""
    side, k = antialias.crop_side_for(size, frame.shape[0], frame.shape[1])
    square = antialias.centre_crop(frame, side)
    return square if k == 1 else antialias.downsample_frame(square, 1.0 / k, method)


def run(source: Path, weights: str, out: Path, max_frames: int | None, slice_bytes: int | None,
        level: int | None = None) -> dict:
    codec = load_codec(weights)
    size = codec.frame_size
    fps = frame_rate(source)
    out.mkdir(parents=True, exist_ok=True)
    errors, bytes_per_frame, times = [], [], {"prepare": [], "encode": [], "decode": []}
    with VideoWriter(out / "roundtrip.mp4", fps, 2 * size, size) as video:
        for n, raw in enumerate(read_frames(source, max_frames)):
            t0 = time.perf_counter()
            frame = prepare(raw, size)
            t1 = time.perf_counter()
            packets = codec.packets(frame, n, max_packet_bytes=slice_bytes, level=level)
            t2 = time.perf_counter()
            decoded = decode_packets(codec, packets)
            t3 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(dt * 1000)
            errors.append(mse(frame, decoded))
            bytes_per_frame.append(sum(len(p) for p in packets))
            video.write(np.hstack([frame, decoded]))
    if not errors:
        raise StreamerError(f"{source} gave no frames")
    mean_bytes = float(np.mean(bytes_per_frame))
    report = {
        "source": str(source), "weights": codec.name, "model_id": f"{codec.model_id:08x}",
        "preset": codec.cfg.preset, "latent_channels": codec.cfg.model.latent_channels, "bits": codec.bits,
        "quantizer": codec.cfg.quantizer.mode, "frame_size": size, "frames": len(errors),
        "psnr_db_mean_of_frames": float(np.mean([psnr_from_mse(e) for e in errors])),
        "psnr_db_of_mean_mse": psnr_from_mse(float(np.mean(errors))),
        "packet_bytes_per_frame": mean_bytes, "packets_per_frame": len(packets),
        "bits_per_pixel": bitstream.bits_per_pixel(int(round(mean_bytes)), size, size),
        "compression_ratio": bitstream.compression_ratio(int(round(mean_bytes)), size, size),
        # fixed-length codes only: range-coded payloads vary with the picture
        "compression_ratio_payload_only": (None if codec.entropy is not None else
                                           bitstream.payload_compression_ratio(codec.cfg.model.latent_channels, codec.bits)),
        "quantizer_level": codec.quantizer.check_level(level), "range_coded": codec.entropy is not None,
        "kbps_at_source_fps": mean_bytes * 8 * fps / 1000, "source_fps": fps,
        "median_ms": {k: float(np.median(v)) for k, v in times.items()},
        "video": str(out / "roundtrip.mp4"),
    }
    (out / "roundtrip.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def decode_packets(codec: NeuralCodec, packets: list[bytes]) -> np.ndarray:
    """Decode a frame from its packets (one whole-frame packet, or slices)."""
    parts = [codec.unpack(p) for p in packets]
    codes = np.concatenate([p.codes for p in parts], axis=1)
    first = parts[0]
    return codec.decode_latents(codec.latents(codes, first.lo, first.hi, first.header.level))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamer.roundtrip", description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=SAMPLE_CLIP, help="video or image file (default: bundled sample)")
    ap.add_argument("--weights", default="default", help="packaged name or path to .json/.safetensors")
    ap.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    ap.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    ap.add_argument("--slice-bytes", type=int, default=None, help="split frames into slices of at most this size")
    ap.add_argument("--level", type=int, default=None,
                    help="quantizer level of step-mode models (0 = finest step); default: the model's")
    args = ap.parse_args(argv)
    try:
        r = run(args.source, args.weights, args.out, args.frames, args.slice_bytes, args.level)
    except (StreamerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quant = (f"step quantizer level {r['quantizer_level']}, range-coded" if r["range_coded"]
             else f"{r['bits']} bit, {r['quantizer']} range")
    payload = r["compression_ratio_payload_only"]
    print(f"{r['frames']} frames of {r['source']} through '{r['weights']}' ({r['preset']}, "
          f"{r['latent_channels']} ch, {quant})")
    print(f"PSNR {r['psnr_db_mean_of_frames']:.2f} dB (mean of frames), {r['bits_per_pixel']:.3f} bpp, "
          f"compression ratio {r['compression_ratio']:.2f}"
          + (f" (payload alone {payload:.2f})" if payload else "")
          + f", {r['kbps_at_source_fps']:.0f} kbps at {r['source_fps']:.0f} fps")
    print(f"wrote {r['video']} (original | decoded) and {args.out / 'roundtrip.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
