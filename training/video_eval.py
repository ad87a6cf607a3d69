"""Video rate-distortion evaluation at call bitrates: the neural codec against x264 and VP8.

    python -m training.evaluate --video --data ../shared/data/val --kbps 100,150,300,500 \\
        [--json] [--out DIR] [--max-frames 150] [--clips N]

Clips are framed as the call frames them (`streamer.sources.prepare`: centre square, the FOMM
Gaussian anti-alias down to the model's 224 px; smaller sources have their square enlarged),
the first `--max-frames` frames of each clip (150), played at the call's 30 fps whatever the
file's own rate (the call's file source paces frames the same way). Stills are not video and are
left out.

Every codec is a `VideoCoder` made fresh for each (clip, target): `encode(frame)` returns that
frame's packets, `decode(packets)` the picture the receiver shows. Rates are the bytes of those
packets (the neural codec's headers included) * 8 / (frames / 30 fps); quality is measured on the
8-bit RGB output: PSNR as the mean of per-frame PSNRs (`training.metrics`, also the PSNR of the
mean MSE) and MS-SSIM (`training.metrics.ms_ssim`), over all frames of all clips.

- `x264`: PyAV libx264, preset veryfast, tune zerolatency, no B-frames, one slice thread,
  ABR at the target with a VBV of 1 s (maxrate = target, bufsize = 1 s), keyint infinite
  (one IDR at the start, as a call without loss).
- `vp8`: PyAV libvpx, deadline realtime, cpu-used 8, lag 0, CBR at the target (minrate = maxrate
  = bitrate), 1 s buffer with 0.5 s initial fill, undershoot 100 % / overshoot 15 %, qmax 56, no
  periodic keyframes: the configuration WebRTC gives libvpx. Skipped, with the reason in the
  report, when PyAV's FFmpeg has no libvpx.
  The anchors code yuv420p (PyAV's conversion, BT.601), so their PSNR includes the RGB <-> YUV
  4:2:0 round trip, as a call's would; the neural codec codes RGB.
- `neural-intra`: every frame an I-frame of the model (`NeuralCodec.packets`, slices of at most
  1,160 bytes, decoded through `unpack` as `streamer.roundtrip` does). Rate control: per clip, the
  quantizer level whose rate over the whole clip is closest to the target (a two-pass oracle,
  which favours this codec). Its levels cannot go below the coarsest step, so low targets can
  land far above their rate; the report says so per row (`rate_error_pct`). Every level is also
  run over all clips (`sweep`): that curve is the one the BD-rates use.
- `neural`: the call's encoder/decoder sessions (I/P frames against a reference, their own rate
  control), registered from `streamer.session` when that module provides `EncoderSession` and
  `DecoderSession` with the interface `SessionCoder` expects; otherwise listed under `skipped`.
  `--decision-threshold T` sets the sender's P-frame decision (`streamer.codec.decision`; 0: off).
- `neural-learned`: the same sessions with the learned conditional P-frames (`--p-frames
  learned`: streamer/codec/conditional.py, the shipped coder in streamer/weights/conditional/):
  their real packets through the receiver's assembler, which checks the CRC of each new
  reference against the sender's (`reference_mismatches` in the row, with `p_frames`: frames
  not decoded on the sender's reference, recovered by the I-frame the receiver asks for; 0
  when both ends agree). Skipped, with the reason, when no shipped coder fits the model.
  The sessions' rows also say where the bits go: `i_frames`, `coded_p_frames`, `skipped_frames`
  (the rate controller's, shown as the last picture again) and `i_frame_bytes_share`.

BD-rate (Bjontegaard): log-rate as a function of PSNR, interpolated piecewise-cubically (PCHIP,
monotone; or a cubic fit, `method="cubic"`), the mean difference over the PSNR range both curves
cover, as percent rate: negative = fewer bits than the anchor at the same PSNR.

Every row also has its per-clip rate and PSNR (`per_clip_kbps`, `per_clip_psnr`, in the order
of `clips`), and the report has the autoencoder's ceiling (`ceiling`): the PSNR of the intra
decoder on the encoder's latents unquantized, per clip and in all. Every neural row decodes
through that decoder (P-frames too: they are coded in its latent space), so in practice no
rate brings a neural codec above it (quantizing the latents only adds error); where an anchor's PSNR is near it, what limits the codec there is the
autoencoder, not the coding of its latents.

Writes `<out>/video-rd.json`, `video-rd.md` and `video-rd.png` (PSNR and MS-SSIM against kbps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Hashable, Protocol, Sequence

import numpy as np
import torch

from streamer.codec import NeuralCodec
from streamer.errors import StreamerError
from streamer.roundtrip import decode_packets
from streamer.sources import prepare

from . import data as D
from .metrics import ms_ssim, mse_uint8, summarize_psnr

FPS = 30.0  # the call's frame rate
MAX_FRAMES = 150
SLICE_BYTES = 1160  # the call's slices: one SCTP chunk
DEFAULT_KBPS = (100, 150, 300, 500)
CODEC_ORDER = ("neural", "neural-learned", "neural-intra", "x264", "vp8")
NEURAL_CODECS = ("neural", "neural-learned", "neural-intra")  # the call's first


# -- clips ----------------------------------------------------------------------------------------

@dataclass
class VideoClip:
    name: str
    frames: list[np.ndarray]  # (size, size, 3) uint8, at the call's framing
    source_fps: float

    @property
    def seconds(self) -> float:
        return len(self.frames) / FPS


def load_video_clips(root: str | Path, size: int = 224, max_frames: int = MAX_FRAMES,
                     max_clips: int | None = None, log: Callable[[str], None] = print) -> list[VideoClip]:
    """The first `max_frames` frames of every video under root, each through `prepare`."""
    import av

    clips: list[VideoClip] = []
    for path in D.folder_sources(root):
        if not D.is_video(path):
            continue
        if max_clips is not None and len(clips) >= max_clips:
            break
        frames: list[np.ndarray] = []
        try:
            with av.open(str(path)) as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"
                fps = float(s.average_rate) if s.average_rate else D.RAW_STREAM_FPS
                if path.suffix.lower() in (".264", ".h264"):
                    fps = D.RAW_STREAM_FPS
                for f in c.decode(s):
                    frames.append(np.array(prepare(f.to_ndarray(format="rgb24"), size)))  # writable
                    if len(frames) >= max_frames:
                        break
        except Exception as e:  # noqa: BLE001 - report and skip a broken clip, never fatal
            log(f"skipping {path}: {type(e).__name__}: {e}")
            continue
        if len(frames) >= 2:
            clips.append(VideoClip(path.name, frames, fps))
    return clips


# -- the coders -----------------------------------------------------------------------------------

class VideoCoder(Protocol):
    """One clip at one target through one codec, frame by frame, in order.

    `encode(frame)` -> the packets this frame puts on the wire (bytes each; their sizes are the
    rate); `decode(packets)` -> the (H, W, 3) uint8 picture the receiver shows for that frame.
    Made fresh per clip and per target, so it may hold state (references, a rate controller).
    `memo_key`: a hashable that names the coder's whole configuration when two targets may
    resolve to the same one on a clip (the intra coder's chosen level), so the evaluation runs it
    once; None: never reused."""

    memo_key: Hashable | None

    def encode(self, frame: np.ndarray) -> list[bytes]: ...

    def decode(self, packets: list[bytes]) -> np.ndarray: ...


# factory(codec, clip, target_kbps, fps) -> VideoCoder
CoderFactory = Callable[[NeuralCodec, VideoClip, float, float], VideoCoder]
CODERS: dict[str, CoderFactory] = {}


def register(name: str, factory: CoderFactory) -> None:
    CODERS[name] = factory


class NeuralIntraCoder:
    """Every frame an I-frame at one quantizer level, in the call's slices, decoded from its
    packets through `unpack` (`streamer.roundtrip.decode_packets`)."""

    def __init__(self, codec: NeuralCodec, level: int) -> None:
        self.codec, self.level, self.n = codec, int(level), 0
        self.memo_key = ("neural-intra", self.level)

    def encode(self, frame: np.ndarray) -> list[bytes]:
        pkts = self.codec.packets(frame, self.n, 0, max_packet_bytes=SLICE_BYTES, level=self.level)
        self.n += 1
        return pkts

    def decode(self, packets: list[bytes]) -> np.ndarray:
        return decode_packets(self.codec, packets)


_level_bytes_cache: dict[tuple[int, str, int], np.ndarray] = {}


@torch.inference_mode()
def intra_level_bytes(codec: NeuralCodec, clip: VideoClip) -> np.ndarray:
    """Bytes of the whole clip at each quantizer level (real packets, range coding included):
    one encoder pass, then quantize and pack at every level."""
    key = (id(codec), clip.name, len(clip.frames))
    if key not in _level_bytes_cache:
        from streamer.codec.codec import to_tensor

        totals = np.zeros(codec.levels, dtype=np.int64)
        for start in range(0, len(clip.frames), 16):
            y = codec.encoder(to_tensor(np.stack(clip.frames[start:start + 16])))
            for lv in range(codec.levels):
                for n, q in enumerate(codec.quantizer.quantize(y, lv)):
                    totals[lv] += sum(len(p) for p in codec.pack(q, start + n, 0, SLICE_BYTES))
        _level_bytes_cache[key] = totals
    return _level_bytes_cache[key]


def make_neural_intra(codec: NeuralCodec, clip: VideoClip, target_kbps: float, fps: float) -> NeuralIntraCoder:
    """Per clip, the level whose whole-clip rate is closest to the target (in log rate)."""
    kbps = intra_level_bytes(codec, clip) * 8 / (len(clip.frames) / fps) / 1000
    level = int(np.argmin(np.abs(np.log(kbps) - np.log(target_kbps))))
    return NeuralIntraCoder(codec, level)


register("neural-intra", make_neural_intra)


class SessionCoder:
    """The call's sessions as a `VideoCoder`: the hook for "neural".

    Uses, from `streamer.session` (and `streamer.ratecontrol` when it is there):
      enc = EncoderSession(codec, max_packet_bytes=1160)   # owns the reference, chooses I or P
      cand = enc.encode(frame, frame_number, timestamp_us, level=L)  # `.packets`, `.frame_type`
      enc.commit(cand)               # it was sent: it becomes the reference
      rc = RateController(target_kbps, fps, levels)
      L = rc.level_for_next_frame(frame_type); rc.frame_sent(nbytes, L, frame_type, t=seconds)
      dec = DecoderSession(codec)
      picture = dec.decode(packets)  # every frame, in order, into its reference -> (H, W, 3) uint8
                                     # (or an object with `.image`)
    A session module of another shape only needs this adapter changed."""

    memo_key = None

    def __init__(self, codec: NeuralCodec, target_kbps: float, fps: float, learned=None, **session_options) -> None:
        """learned: the learned conditional coder for the P-frames (`--p-frames learned`);
        session_options: more EncoderSession options (e.g. decision_threshold)."""
        from streamer.session import DecoderSession, EncoderSession  # type: ignore[import-not-found]

        if learned is not None:
            session_options = {k: v for k, v in session_options.items() if k != "decision_threshold"}
            session_options["learned"] = learned
        self.enc = EncoderSession(codec, max_packet_bytes=SLICE_BYTES, **session_options)
        self.dec = DecoderSession(codec, learned=learned)
        self.fps, self.n, self.t = fps, 0, 0  # frames sent, frames offered
        self.frames_by_type, self.bytes_by_type = [0, 0], [0, 0]  # [I, P]: where the bits go
        try:
            from streamer.ratecontrol import RateController  # type: ignore[import-not-found]
        except ImportError:
            self.rc = None  # the session's own level
        else:  # (learned P-frames have the finest levels only, as the sender's)
            levels = codec.levels if learned is None else min(codec.levels, learned.levels)
            self.rc = RateController(target_kbps, fps, levels)

    def encode(self, frame: np.ndarray) -> list[bytes]:
        t = self.t / self.fps
        self.t += 1
        if self.rc is not None and self.n and self.rc.should_skip_frame():
            self.rc.frame_dropped(t)  # as the sender does: even the coarsest level is over budget,
            return []                 # so no packets; the receiver shows its last picture again
        ftype = self.enc.next_frame_type()
        level = None if self.rc is None else self.rc.level_for_next_frame(int(ftype))
        cand = self.enc.encode(frame, self.n, int(t * 1e6), level=level)
        self.enc.commit(cand)
        kind = 0 if int(cand.frame_type) == 0 else 1
        self.frames_by_type[kind] += 1
        self.bytes_by_type[kind] += sum(len(p) for p in cand.packets)
        if self.rc is not None:
            self.rc.frame_sent(sum(len(p) for p in cand.packets), cand.q.level, int(cand.frame_type), t=t)
        self.n += 1
        return list(cand.packets)

    def decode(self, packets: list[bytes]) -> np.ndarray:
        out = self.dec.decode(packets)
        if getattr(self.dec, "needs_keyframe", False):  # the receiver's request, as over the meta channel
            self.enc.request_keyframe(self.dec.assembler.broken_at)
        return getattr(out, "image", out)

    @property
    def learned_counts(self) -> tuple[int, int]:
        """(learned P-frames decoded, those not decoded on the sender's reference)."""
        n = self.dec.assembler.n
        return n.learned, n.learned_mismatched + n.learned_undecodable


def session_status() -> str | None:
    """None when the call's sessions can be evaluated, else why not."""
    try:
        import streamer.session as S  # type: ignore[import-not-found]
    except ImportError as e:
        return f"streamer/session.py is not there yet ({e.__class__.__name__}: {e})"
    missing = [n for n in ("EncoderSession", "DecoderSession") if not hasattr(S, n)]
    if missing:
        return f"streamer.session has no {', '.join(missing)}"
    return None


def maybe_register_sessions(log: Callable[[str], None] = print, **session_options) -> str | None:
    why = session_status()
    if why is None:
        register("neural", lambda codec, clip, kbps, fps: SessionCoder(codec, kbps, fps, **session_options))
    return why


def learned_status(codec: NeuralCodec, coder: str = "default") -> tuple[object | None, str | None]:
    """(the learned coder `coder`, the shipped one by default, None) when it fits `codec`, else
    (None, why not)."""
    from streamer.codec import conditional as cond
    from streamer.errors import WeightsError

    try:
        return cond.load(coder, codec.model_id), None
    except WeightsError as e:
        return None, str(e)


# -- anchors: x264 and VP8 through PyAV -----------------------------------------------------------

def vp8_status() -> str | None:
    """None when PyAV's FFmpeg can encode VP8 with libvpx, else why not."""
    import av

    if "libvpx" not in av.codecs_available:
        return f"PyAV {av.__version__}'s FFmpeg has no libvpx encoder (av.codecs_available)"
    return None


def anchor_options(kind: str, kbps: float, fps: float) -> dict[str, str]:
    k = int(round(kbps))
    if kind == "x264":
        return {"preset": "veryfast", "tune": "zerolatency", "threads": "1",
                "x264-params": f"bframes=0:keyint=infinite:vbv-maxrate={k}:vbv-bufsize={k}"}
    if kind == "vp8":
        return {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "threads": "1",
                "minrate": f"{k}k", "maxrate": f"{k}k", "bufsize": f"{k}k",  # min = max = b: CBR
                "rc_init_occupancy": f"{k // 2}k", "undershoot-pct": "100", "overshoot-pct": "15",
                "qmin": "2", "qmax": "56", "g": "100000", "auto-alt-ref": "0"}
    raise ValueError(kind)


class AnchorCoder:
    """x264 or VP8 at a target rate, one packet per frame (no B-frames, no look-ahead), decoded
    by FFmpeg's own decoder as each packet arrives."""

    memo_key = None
    ENCODERS = {"x264": ("libx264", "h264"), "vp8": ("libvpx", "vp8")}

    def __init__(self, kind: str, kbps: float, fps: float, size: tuple[int, int]) -> None:
        import av

        enc_name, dec_name = self.ENCODERS[kind]
        self.kind, self.n = kind, 0
        rate = Fraction(fps).limit_denominator(1001)
        self.enc = av.CodecContext.create(enc_name, "w")
        self.enc.height, self.enc.width = size
        self.enc.pix_fmt = "yuv420p"
        self.enc.time_base = 1 / rate
        self.enc.framerate = rate
        self.enc.bit_rate = int(kbps * 1000)
        self.enc.options = anchor_options(kind, kbps, fps)
        self.dec = av.CodecContext.create(dec_name, "r")
        self.dec.thread_count = 1  # no frame threading: no decoder delay
        self._av = av

    def encode(self, frame: np.ndarray) -> list[bytes]:
        vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(format="yuv420p")
        vf.pts = self.n
        self.n += 1
        return [bytes(p) for p in self.enc.encode(vf)]

    def decode(self, packets: list[bytes]) -> np.ndarray:
        out = []
        for data in packets:
            out += self.dec.decode(self._av.Packet(data))
        if len(out) != 1:
            raise StreamerError(f"{self.kind}: {len(out)} pictures decoded for frame {self.n - 1}, "
                                "expected 1 (encoder or decoder delay)")
        return out[0].to_ndarray(format="rgb24")


register("x264", lambda codec, clip, kbps, fps: AnchorCoder("x264", kbps, fps, clip.frames[0].shape[:2]))
register("vp8", lambda codec, clip, kbps, fps: AnchorCoder("vp8", kbps, fps, clip.frames[0].shape[:2]))


# -- running and measuring ------------------------------------------------------------------------

@dataclass
class ClipRun:
    clip: str
    frames: int
    bytes: int
    mses: list[float]
    ssims: list[float]
    packets: int
    extra: dict = field(default_factory=dict)


def quality(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray], batch: int = 25,
            ssim_every: int = 1) -> tuple[list[float], list[float]]:
    """Per-frame MSE (8-bit RGB) of every frame, and MS-SSIM of every `ssim_every`-th frame."""
    mses = [mse_uint8(r, o) for r, o in zip(refs, outs)]
    refs, outs = refs[::ssim_every], outs[::ssim_every]
    ssims: list[float] = []
    for s in range(0, len(refs), batch):
        x = torch.from_numpy(np.stack(refs[s:s + batch])).permute(0, 3, 1, 2)
        y = torch.from_numpy(np.stack(outs[s:s + batch])).permute(0, 3, 1, 2)
        ssims += ms_ssim(x, y).tolist()
    return mses, ssims


def run_clip(coder: VideoCoder, clip: VideoClip, ssim_every: int = 1) -> ClipRun:
    outs, nbytes, npk = [], 0, 0
    for frame in clip.frames:
        pkts = coder.encode(frame)
        nbytes += sum(len(p) for p in pkts)
        npk += len(pkts)
        outs.append(coder.decode(pkts))
    mses, ssims = quality(clip.frames, outs, ssim_every=ssim_every)
    return ClipRun(clip.name, len(clip.frames), nbytes, mses, ssims, npk)


def summarize(runs: list[ClipRun], fps: float = FPS) -> dict:
    frames = sum(r.frames for r in runs)
    kbps = sum(r.bytes for r in runs) * 8 / (frames / fps) / 1000
    per_clip = [r.bytes * 8 / (r.frames / fps) / 1000 for r in runs]
    mses = [m for r in runs for m in r.mses]
    return {"kbps": kbps, **summarize_psnr(mses), "ms_ssim": float(np.mean([s for r in runs for s in r.ssims])),
            "frames": frames, "clips": len(runs), "packets_per_frame": sum(r.packets for r in runs) / frames,
            "kbps_per_clip_min": float(min(per_clip)), "kbps_per_clip_max": float(max(per_clip)),
            "per_clip_kbps": [round(k, 2) for k in per_clip],
            "per_clip_psnr": [round(summarize_psnr(r.mses)["psnr_mean_of_frames"], 3) for r in runs]}


def autoencoder_ceiling(codec: NeuralCodec, clips: list[VideoClip], batch: int = 30) -> dict:
    """The intra decoder on the encoder's unquantized latents: PSNR (mean of frames) per clip and
    over all frames: in practice the most any neural row can reach on these clips."""
    from streamer.codec.codec import to_tensor, to_uint8

    per_clip, mses = [], []
    with torch.inference_mode():
        for clip in clips:
            clip_mses = []
            for s in range(0, len(clip.frames), batch):
                frames = clip.frames[s:s + batch]
                out = to_uint8(codec.model.decoder(codec.encoder(to_tensor(np.stack(frames)))))
                clip_mses += [mse_uint8(a, b) for a, b in zip(frames, out)]
            per_clip.append(round(summarize_psnr(clip_mses)["psnr_mean_of_frames"], 3))
            mses += clip_mses
    return {"psnr_mean_of_frames": summarize_psnr(mses)["psnr_mean_of_frames"], "per_clip_psnr": per_clip}


# -- BD-rate --------------------------------------------------------------------------------------

def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson monotone slopes (the PCHIP of Fritsch & Butland, with its end rule)."""
    h, delta = np.diff(x), np.diff(y) / np.diff(x)
    n = len(x)
    d = np.zeros(n)
    if n == 2:
        return np.full(2, delta[0])
    for k in range(1, n - 1):
        if delta[k - 1] * delta[k] > 0:
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])

    def end(h0: float, h1: float, d0: float, d1: float) -> float:
        s = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if np.sign(s) != np.sign(d0):
            return 0.0
        if np.sign(d0) != np.sign(d1) and abs(s) > 3 * abs(d0):
            return 3 * d0
        return s

    d[0] = end(h[0], h[1], delta[0], delta[1])
    d[-1] = end(h[-1], h[-2], delta[-1], delta[-2])
    return d


def _pchip_eval(x: np.ndarray, y: np.ndarray, d: np.ndarray, t: np.ndarray) -> np.ndarray:
    k = np.clip(np.searchsorted(x, t, side="right") - 1, 0, len(x) - 2)
    h = x[k + 1] - x[k]
    s = (t - x[k]) / h
    h00, h10 = 2 * s ** 3 - 3 * s ** 2 + 1, s ** 3 - 2 * s ** 2 + s
    h01, h11 = -2 * s ** 3 + 3 * s ** 2, s ** 3 - s ** 2
    return h00 * y[k] + h10 * h * d[k] + h01 * y[k + 1] + h11 * h * d[k + 1]


def _curve(rates: Sequence[float], psnrs: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """(PSNR ascending, log rate) with repeated points merged; None with fewer than 2 points."""
    pts = sorted({(round(float(p), 9), float(np.log(r))) for r, p in zip(rates, psnrs) if r > 0})
    xs, ys = [], []
    for p, lr in pts:
        if xs and p <= xs[-1]:
            continue  # same PSNR twice: keep the lower rate
        xs.append(p)
        ys.append(lr)
    return (np.array(xs), np.array(ys)) if len(xs) >= 2 else None


def bd_rate(anchor: tuple[Sequence[float], Sequence[float]], test: tuple[Sequence[float], Sequence[float]],
            method: str = "pchip") -> float | None:
    """Bjontegaard delta rate of `test` against `anchor`, each (rates, PSNRs), in percent:
    the mean of log(rate_test / rate_anchor) over the PSNR range both cover, as exp(.) - 1.
    None when either curve has fewer than two distinct points or the PSNR ranges do not overlap."""
    a, b = _curve(*anchor), _curve(*test)
    if a is None or b is None:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[0][-1], b[0][-1])
    if not hi > lo:
        return None
    if method == "pchip":
        t = np.linspace(lo, hi, 2001)
        ia = np.trapezoid(_pchip_eval(*a, _pchip_slopes(*a), t), t)
        ib = np.trapezoid(_pchip_eval(*b, _pchip_slopes(*b), t), t)
    elif method == "cubic":
        def integral(c: tuple[np.ndarray, np.ndarray]) -> float:
            p = np.polyint(np.polyfit(c[0], c[1], min(3, len(c[0]) - 1)))
            return float(np.polyval(p, hi) - np.polyval(p, lo))
        ia, ib = integral(a), integral(b)
    else:
        raise ValueError(f"unknown BD-rate method {method!r} (pchip or cubic)")
    return float((np.exp((ib - ia) / (hi - lo)) - 1) * 100)


def bd_psnr_range(anchor: tuple[Sequence[float], Sequence[float]],
                  test: tuple[Sequence[float], Sequence[float]]) -> list[float] | None:
    a, b = _curve(*anchor), _curve(*test)
    if a is None or b is None:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[0][-1], b[0][-1])
    return [float(lo), float(hi)] if hi > lo else None


# -- the evaluation -------------------------------------------------------------------------------

def machine() -> str:
    import av

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPU ({platform.system()} {platform.machine()}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} thread), PyAV {av.__version__}")


def evaluate_video(data_dir: str | Path, kbps: Sequence[float] = DEFAULT_KBPS, weights: str = "default",
                   max_frames: int = MAX_FRAMES, max_clips: int | None = None, codecs: Sequence[str] | None = None,
                   sweep: bool = True, codec: NeuralCodec | None = None, threads: int = 1, ssim_every: int = 1,
                   log: Callable[[str], None] = print, command: str | None = None,
                   decision_threshold: float | list[float] | None | str = "default",
                   learned_coder: str = "default") -> dict:
    """The whole video evaluation; returns the report (see the module docstring).
    decision_threshold: the "neural" sessions' P-frame decision (EncoderSession's
    decision_threshold: steps, one or one per level; None or 0: off); "default": the session's.
    learned_coder: the "neural-learned" sessions' coder (a saved coder's path; "default": the
    shipped one), to measure a candidate before shipping it."""
    t0 = time.time()
    torch.set_num_threads(threads)
    codec = codec if codec is not None else NeuralCodec.load(weights)
    skipped: dict[str, str] = {}
    options = {} if decision_threshold == "default" else {"decision_threshold": decision_threshold}
    why = maybe_register_sessions(log, **options)
    if why:
        skipped["neural"] = why
    why = vp8_status()
    if why:
        skipped["vp8"] = why
    learned, why = learned_status(codec, learned_coder)
    if why or session_status():
        skipped["neural-learned"] = why or session_status()
    else:
        register("neural-learned", lambda codec, clip, kbps, fps: SessionCoder(codec, kbps, fps, learned))
    names = [c for c in CODEC_ORDER if c in CODERS and c not in skipped and (codecs is None or c in codecs)]
    for name, reason in skipped.items():
        log(f"{name}: skipped: {reason}")
    clips = load_video_clips(data_dir, codec.frame_size, max_frames, max_clips, log)
    if not clips:
        raise StreamerError(f"no readable video under {data_dir}")
    log(f"{len(clips)} clips, {sum(len(c.frames) for c in clips)} frames at {codec.frame_size} px, "
        f"{FPS:g} fps ({time.time() - t0:.0f} s)")

    memo: dict[tuple[str, Hashable], ClipRun] = {}

    def run(coder: VideoCoder, clip: VideoClip) -> ClipRun:
        key = getattr(coder, "memo_key", None)
        if key is None:
            return run_clip(coder, clip, ssim_every)
        if (clip.name, key) not in memo:
            memo[(clip.name, key)] = run_clip(coder, clip, ssim_every)
        return memo[(clip.name, key)]

    rows: list[dict] = []
    for name in names:
        for target in kbps:
            t1 = time.time()
            runs, levels, checked = [], [], [0, 0]
            frames_by_type, bytes_by_type = [0, 0], [0, 0]
            for clip in clips:
                coder = CODERS[name](codec, clip, float(target), FPS)
                if isinstance(coder, NeuralIntraCoder):
                    levels.append(coder.level)
                runs.append(run(coder, clip))
                if name == "neural-learned":
                    checked = [a + b for a, b in zip(checked, coder.learned_counts)]
                if isinstance(coder, SessionCoder):
                    frames_by_type = [a + b for a, b in zip(frames_by_type, coder.frames_by_type)]
                    bytes_by_type = [a + b for a, b in zip(bytes_by_type, coder.bytes_by_type)]
            row = {"codec": name, "target_kbps": float(target), **summarize(runs)}
            if sum(frames_by_type):  # the call's sessions: I-frames, P-frames, frames skipped
                row["i_frames"], row["coded_p_frames"] = frames_by_type
                row["skipped_frames"] = row["frames"] - sum(frames_by_type)
                row["i_frame_bytes_share"] = round(bytes_by_type[0] / max(1, sum(bytes_by_type)), 4)
            if name == "neural-learned":
                row["p_frames"], row["reference_mismatches"] = checked
            row["rate_error_pct"] = (row["kbps"] / float(target) - 1) * 100
            if levels:
                steps = codec.cfg.quantizer.steps
                row["levels"] = {str(lv): levels.count(lv) for lv in sorted(set(levels))}
                row["steps"] = {str(lv): steps[lv] for lv in sorted(set(levels))}
            row["seconds"] = round(time.time() - t1, 1)
            rows.append(row)
            log(f"{name} @ {target:g} kbps: {row['kbps']:.1f} kbps, {row['psnr_mean_of_frames']:.2f} dB, "
                f"MS-SSIM {row['ms_ssim']:.4f} ({row['seconds']:.0f} s)")

    sweep_rows: list[dict] = []
    if sweep and "neural-intra" in names and codec.cfg.quantizer.mode == "step":
        # the levels up to 3x the highest target (finer ones are far off the call's rates)
        total = sum(intra_level_bytes(codec, c) for c in clips) * 8 / (sum(len(c.frames) for c in clips) / FPS) / 1000
        keep = [lv for lv in range(codec.levels) if total[lv] <= 3 * max(kbps)] or [codec.levels - 1]
        keep = sorted(set(keep) | {min(keep) - 1} - {-1})  # one above, for the top of the curve
        for lv in keep:
            runs = [run(NeuralIntraCoder(codec, lv), clip) for clip in clips]
            sweep_rows.append({"codec": "neural-intra", "level": lv, "step": codec.cfg.quantizer.steps[lv],
                               **summarize(runs)})
            log(f"neural-intra level {lv}: {sweep_rows[-1]['kbps']:.1f} kbps, "
                f"{sweep_rows[-1]['psnr_mean_of_frames']:.2f} dB")

    ceiling = autoencoder_ceiling(codec, clips) if any(n in NEURAL_CODECS for n in names) else None
    if ceiling:
        log(f"autoencoder ceiling (unquantized latents): {ceiling['psnr_mean_of_frames']:.2f} dB")
    report = {"command": command, "machine": machine(), "data": str(data_dir), "weights": str(weights),
              "model_id": f"{codec.model_id:08x}", "frame_size": codec.frame_size, "fps": FPS,
              "max_frames_per_clip": max_frames, "ms_ssim_every": ssim_every, "clips": [c.name for c in clips],
              "frames": sum(len(c.frames) for c in clips), "targets_kbps": [float(k) for k in kbps],
              "codecs": names, "skipped": skipped, "results": rows, "sweep": sweep_rows, "ceiling": ceiling,
              "decision_threshold": decision_threshold, "learned_coder": learned_coder}
    report.update(bd_rates(report))
    report["seconds"] = round(time.time() - t0, 1)
    return report


def curve_of(report: dict, name: str) -> tuple[list[float], list[float]] | None:
    """(kbps, PSNR) points of a codec: the intra codec's level sweep when there is one (its
    whole RD curve), else its rows at the targets."""
    rows = [r for r in report.get("sweep", []) if r["codec"] == name] or \
           [r for r in report["results"] if r["codec"] == name]
    if not rows:
        return None
    return [r["kbps"] for r in rows], [r["psnr_mean_of_frames"] for r in rows]


def bd_rates(report: dict) -> dict:
    """The BD-rates of the best neural codec (the fewest bits against x264, else VP8; else the
    first with a curve) under the top-level keys, and of every pair under "bd_rates"."""
    have = [n for n in NEURAL_CODECS if curve_of(report, n)]
    best = have[0] if have else None
    for anchor in ("x264", "vp8"):
        scored = [(bd_rate(curve_of(report, anchor), curve_of(report, n)), n) for n in have] \
            if curve_of(report, anchor) else []
        scored = [(v, n) for v, n in scored if v is not None]
        if scored:
            best = min(scored)[1]
            break
    out: dict = {"bd_rate_codec": best, "bd_rate_method": "pchip: log rate vs PSNR (mean of frames), overlap",
                 "bd_rate_psnr_range": {}}
    for key, anchor in (("bd_rate_vs_x264", "x264"), ("bd_rate_vs_vp8", "vp8"), ("bd_rate_vs_intra", "neural-intra")):
        a, t = curve_of(report, anchor), (curve_of(report, best) if best else None)
        if a is None or t is None or anchor == best:
            out[key] = None
            continue
        out[key] = bd_rate(a, t)
        out["bd_rate_psnr_range"][anchor] = bd_psnr_range(a, t)
    # every neural codec against every anchor, for the table
    out["bd_rates"] = {f"{n} vs {a}": bd_rate(curve_of(report, a), curve_of(report, n))
                       for n in NEURAL_CODECS for a in ("x264", "vp8", "neural-intra", "neural")
                       if n != a and curve_of(report, n) and curve_of(report, a)}
    return out


# -- output ---------------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f} %"


def markdown(report: dict) -> str:
    lines = [f"Video RD on `{report['data']}`: {len(report['clips'])} clips, {report['frames']} frames at "
             f"{report['frame_size']} px, {report['fps']:g} fps (first {report['max_frames_per_clip']} frames of each clip; "
             f"MS-SSIM on every {report['ms_ssim_every']}. frame, PSNR on all); "
             f"{report['machine']}; {report['seconds']:.0f} s.", "",
             "| codec | target kbps | kbps | rate error | PSNR mean of frames (dB) | MS-SSIM | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["results"]:
        note = ""
        if "levels" in r:
            note = "levels " + ", ".join(f"{lv} (step {r['steps'][lv]:g}) x{n}" for lv, n in r["levels"].items())
        if "reference_mismatches" in r:
            note = f"{r['p_frames']} P-frames, {r['reference_mismatches']} reference mismatches"
        lines.append(f"| {r['codec']} | {r['target_kbps']:g} | {r['kbps']:.1f} | {r['rate_error_pct']:+.0f} % | "
                     f"{r['psnr_mean_of_frames']:.2f} | {r['ms_ssim']:.4f} | {note} |")
    lines += per_clip_table(report)
    if report.get("sweep"):
        lines += ["", "neural-intra at each fixed quantizer level (the curve its BD-rates use):", "",
                  "| level | step | kbps | PSNR mean of frames (dB) | MS-SSIM |", "| ---: | ---: | ---: | ---: | ---: |"]
        for r in report["sweep"]:
            lines.append(f"| {r['level']} | {r['step']:g} | {r['kbps']:.1f} | {r['psnr_mean_of_frames']:.2f} | {r['ms_ssim']:.4f} |")
    lines += ["", f"BD-rate of {report['bd_rate_codec']} (PCHIP of log rate vs PSNR over the common PSNR range; "
              "negative = fewer bits than the anchor): "
              f"vs x264 {_pct(report['bd_rate_vs_x264'])}, vs VP8 {_pct(report['bd_rate_vs_vp8'])}, "
              f"vs neural-intra {_pct(report['bd_rate_vs_intra'])}."]
    for k, v in report.get("bd_rate_psnr_range", {}).items():
        lines.append(f"- common PSNR range vs {k}: " + ("none" if v is None else f"{v[0]:.2f}-{v[1]:.2f} dB"))
    if report.get("bd_rates"):
        lines.append("- every pair: " + ", ".join(f"{k} {_pct(v)}" for k, v in report["bd_rates"].items()))
    for k, v in report["skipped"].items():
        lines.append(f"- {k}: skipped: {v}")
    return "\n".join(lines)


def per_clip_table(report: dict, near_kbps: float = 300) -> list[str]:
    """Markdown lines: every clip's kbps and PSNR through each codec at the target nearest
    `near_kbps`, beside the autoencoder's ceiling."""
    if not report.get("targets_kbps") or not all("per_clip_psnr" in r for r in report["results"]):
        return []
    target = min(report["targets_kbps"], key=lambda t: abs(t - near_kbps))
    rows = [r for r in report["results"] if r["target_kbps"] == target]
    ceiling = report.get("ceiling")
    lines = ["", f"Per clip at {target:g} kbps (kbps / PSNR dB)"
             + (", and the autoencoder's ceiling (unquantized latents, dB):" if ceiling else ":"), "",
             "| clip | " + " | ".join(r["codec"] for r in rows) + (" | ceiling |" if ceiling else " |"),
             "| --- |" + " ---: |" * (len(rows) + bool(ceiling))]
    for i, name in enumerate(report["clips"]):
        cells = [f"{r['per_clip_kbps'][i]:.0f} / {r['per_clip_psnr'][i]:.2f}" for r in rows]
        if ceiling:
            cells.append(f"{ceiling['per_clip_psnr'][i]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if ceiling:
        lines.append(f"| all | " + " | ".join(f"{r['kbps']:.0f} / {r['psnr_mean_of_frames']:.2f}" for r in rows)
                     + f" | {ceiling['psnr_mean_of_frames']:.2f} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"neural": ("o", "C0"), "neural-learned": ("D", "C4"), "neural-intra": ("s", "C1"), "x264": ("v", "C2"),
              "vp8": ("^", "C3")}
    kbps_seen: list[float] = []
    for name in CODEC_ORDER:
        marker, color = styles[name]
        rows = sorted([r for r in report["results"] if r["codec"] == name], key=lambda r: r["kbps"])
        sweep = sorted([r for r in report.get("sweep", []) if r["codec"] == name], key=lambda r: r["kbps"])
        kbps_seen += [r["kbps"] for r in rows + sweep]
        for ax, key in zip(axes, ("psnr_mean_of_frames", "ms_ssim")):
            first = ax is axes[0]
            if sweep:
                ax.plot([r["kbps"] for r in sweep], [r[key] for r in sweep], "--", marker=marker, color=color,
                        ms=4, alpha=0.7, label=f"{name} (each quantizer level)" if first else None)
            if rows:
                ax.plot([r["kbps"] for r in rows], [r[key] for r in rows], "none" if sweep else "-", marker=marker,
                        color=color, ms=9 if sweep else 6, mfc="none" if sweep else color,
                        label=f"{name} (at the targets)" if first else None)
    ticks = [t for t in (50, 100, 150, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000)
             if kbps_seen and min(kbps_seen) / 1.2 <= t <= max(kbps_seen) * 1.2]
    for t in report["targets_kbps"]:
        for ax in axes:
            ax.axvline(t, color="0.85", lw=0.8, zorder=0)
    for ax, ylabel in zip(axes, ("PSNR, mean of frames (dB)", "MS-SSIM")):
        ax.set_xlabel("kbps (packet bytes x 8 / duration at 30 fps); grey: the targets")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    if report.get("ceiling"):
        axes[0].axhline(report["ceiling"]["psnr_mean_of_frames"], ls=":", color="0.4",
                        label="autoencoder ceiling (unquantized latents)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(report['data']).name}: {len(report['clips'])} clips, {report['frames']} frames, "
                 f"{report['frame_size']} px at {report['fps']:g} fps; BD-rate {report['bd_rate_codec']} vs x264 "
                 f"{_pct(report['bd_rate_vs_x264'])}, vs VP8 {_pct(report['bd_rate_vs_vp8'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command line (through training.evaluate --video) -----------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("video evaluation (--video)")
    g.add_argument("--kbps", default=",".join(str(k) for k in DEFAULT_KBPS),
                   help="comma-separated target rates in kbit/s (default 100,150,300,500)")
    g.add_argument("--max-frames", type=int, default=MAX_FRAMES, help="frames per clip (default 150)")
    g.add_argument("--clips", type=int, default=None, help="only the first N clips")
    g.add_argument("--codecs", default=None, help="comma-separated subset of neural,neural-learned,neural-intra,x264,vp8")
    g.add_argument("--no-sweep", action="store_true", help="skip the intra codec's run at each level")
    g.add_argument("--decision-threshold", default="default", metavar="T|T0,T1,...",
                   help="neural: P-frames keep the reference's code where the latent is within T quantizer "
                        "steps of it (one value, or one per level; 0: off; default: the session's)")
    g.add_argument("--learned-coder", default="default", metavar="PATH",
                   help="neural-learned: a saved learned coder (training.conditional export --out PATH; "
                        "default: the shipped one)")
    g.add_argument("--ssim-every", type=int, default=1,
                   help="MS-SSIM on every Nth frame (default 1: all; PSNR is always on every frame)")


def parse_kbps(text: str) -> list[float]:
    try:
        rates = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        rates = []
    if not rates or any(r <= 0 for r in rates):
        raise StreamerError(f"--kbps {text!r}: give positive rates, comma-separated (e.g. 100,150,300,500)")
    return sorted(rates)


def parse_threshold(text: str) -> float | list[float] | str:
    """--decision-threshold: "default", one number, or numbers separated by commas (one per level)."""
    if text == "default":
        return text
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v < 1.5 for v in values):
        raise StreamerError(f"--decision-threshold {text!r}: quantizer steps in [0, 1.5), one or one per level")
    return values[0] if len(values) == 1 else values


def main(args: argparse.Namespace, argv: list[str] | None, log: Callable[[str], None]) -> int:
    """`training.evaluate --video`: args parsed by its parser (with `add_arguments`)."""
    from .config import check_media, require_extra

    try:
        check_media(args.data, "--data")  # mistakes up front, before minutes of work
        if args.out:
            require_extra("matplotlib")
        kbps = parse_kbps(args.kbps)
        if args.max_frames < 2:
            raise StreamerError("--max-frames must be at least 2")
        codecs = [c.strip() for c in args.codecs.split(",")] if args.codecs else None
        if codecs and (bad := [c for c in codecs if c not in CODEC_ORDER]):
            raise StreamerError(f"--codecs: unknown {', '.join(bad)} (choose from {', '.join(CODEC_ORDER)})")
        threshold = parse_threshold(getattr(args, "decision_threshold", "default"))
        command = "python -m training.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
        report = evaluate_video(args.data, kbps, args.weights, args.max_frames, args.clips, codecs,
                                sweep=not args.no_sweep, threads=args.threads, ssim_every=max(1, args.ssim_every),
                                log=log, command=command, decision_threshold=threshold,
                                learned_coder=args.learned_coder)
    except StreamerError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "video-rd.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "video-rd.md").write_text(markdown(report) + "\n")
        plot(report, out / "video-rd.png")
        log(f"wrote {out / 'video-rd.json'}, {out / 'video-rd.md'}, {out / 'video-rd.png'}")
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0
