"""`NeuralCodec`: the encoder, quantizer and decoder of one model, frames in and out.

Frames at this boundary are uint8 NumPy arrays (H, W, 3) in RGB, the form sources produce and
the screen consumes. Encoder and decoder are plain callables (Tensor -> Tensor) so faster
backends (torch.compile, int8, TensorRT: `streamer.backends`) can be swapped in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import FrameSizeError, PacketError
from . import bitstream, entropy, residual, weights
from .model import CompressiveAutoencoder
from .model import latent_shape as model_latent_shape
from .presets import STRIDE, get_preset
from .quantizer import Quantized, Quantizer, QuantizerConfig

TensorFn = Callable[[Tensor], Tensor]


def to_tensor(frames: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise FrameSizeError(f"expected uint8 frames of shape (H, W, 3), got {a.dtype} {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(x: Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), rounded."""
    return x.detach().float().clamp(0, 1).mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class NeuralCodec:
    def __init__(self, cfg: weights.CodecConfig, model: CompressiveAutoencoder, model_id: int,
                 name: str = "custom") -> None:
        self.cfg = cfg
        self.model = model.eval()
        self.model_id = model_id
        self.name = name
        self.quantizer = Quantizer(cfg.quantizer, cfg.model.latent_channels)
        self.entropy = self._entropy_coder(cfg.entropy_counts)
        self.residual = self._residual_coder(cfg.residual_counts)
        self.encoder: TensorFn = self.model.encoder
        self.decoder: TensorFn = self.model.decoder
        self.backend = "eager"

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path = weights.DEFAULT_NAME) -> "NeuralCodec":
        cfg, model, mid = weights.load(name_or_path)
        return cls(cfg, model, mid, name=Path(str(name_or_path)).stem)

    @classmethod
    def untrained(cls, preset: str = "lite", bits: int = 6, mode: str = "fixed", frame_size: int = 224,
                  seed: int = 0, **overrides: int) -> "NeuralCodec":
        """Random weights (for tests and before training); the fixed range is calibrated on noise."""
        torch.manual_seed(seed)
        cfg = weights.CodecConfig(preset=preset, model=get_preset(preset, **overrides),
                                  quantizer=QuantizerConfig(bits=bits, mode=mode), frame_size=frame_size)
        model = CompressiveAutoencoder(cfg.model).eval()
        codec = cls(cfg, model, 0, name=f"untrained-{preset}")
        if mode == "fixed":
            with torch.inference_mode():
                codec.quantizer.calibrate(model.encoder(torch.rand(2, 3, 64, 64)), coverage=1.0)
        state = {k: v for k, v in model.state_dict().items()}
        codec.model_id = weights.model_id(cfg, state)
        return codec

    def _entropy_coder(self, counts: np.ndarray | None) -> entropy.EntropyCoder | None:
        if counts is None:
            return None
        alphabets = [self.quantizer.alphabet(lv) for lv in range(self.levels)]
        return entropy.EntropyCoder(counts, [a[0] for a in alphabets], [a[1] for a in alphabets])

    def _residual_coder(self, counts: np.ndarray | None) -> residual.ResidualCoder | None:
        if counts is None:
            return None
        return residual.ResidualCoder(counts, [self.quantizer.alphabet(lv)[0] for lv in range(self.levels)])

    @property
    def codes_p_frames(self) -> bool:
        """The model has residual tables: frames after the first can be P-frames."""
        return self.residual is not None and self.entropy is not None

    def set_residual_counts(self, counts: np.ndarray | None) -> None:
        """Install P-frame residual tables (levels, C, contexts, 511), e.g. freshly fitted."""
        if counts is not None:
            counts = weights.check_residual_counts(np.asarray(counts), self.cfg)
        self.cfg.residual_counts = counts
        self.residual = self._residual_coder(counts)

    def set_entropy_counts(self, counts: np.ndarray | None) -> None:
        """Install entropy tables (levels, C, contexts, 256), e.g. freshly fitted by training."""
        if counts is not None:
            counts = weights.check_counts(np.asarray(counts), self.cfg)
        self.cfg.entropy_counts = counts
        self.entropy = self._entropy_coder(counts)

    @property
    def levels(self) -> int:
        """Quantizer levels a sender can choose from (step mode: one per step size)."""
        return len(self.cfg.quantizer.steps) if self.cfg.quantizer.mode == "step" else 1

    @property
    def bits(self) -> int:
        return self.cfg.quantizer.bits

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    def check_frame(self, frame: np.ndarray) -> None:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise FrameSizeError(f"expected a uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
        self.model.check_size(frame.shape[0], frame.shape[1])

    # -- frames <-> codes ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frame: np.ndarray, level: int | None = None) -> Quantized:
        """One uint8 (H, W, 3) frame -> quantized codes (C, H/8, W/8) at `level` (step mode;
        None: the model's default level)."""
        self.check_frame(frame)
        return self.quantizer.quantize(self.encoder(to_tensor(frame)), level)[0]

    @torch.inference_mode()
    def encode_with_latents(self, frame: np.ndarray, level: int | None = None) -> tuple[np.ndarray, Quantized]:
        """As `encode`, and the encoder's latents (C, H/8, W/8) float32 the codes were rounded
        from (one encoder pass): what the sender's P-frame decision needs (decision.py)."""
        self.check_frame(frame)
        y = self.encoder(to_tensor(frame))
        return y[0].float().cpu().numpy(), self.quantizer.quantize(y, level)[0]

    @torch.inference_mode()
    def encode_batch(self, frames: np.ndarray, level: int | None = None) -> list[Quantized]:
        if frames.ndim != 4:
            raise FrameSizeError(f"expected (N, H, W, 3) frames, got {frames.shape}")
        self.model.check_size(frames.shape[1], frames.shape[2])
        return self.quantizer.quantize(self.encoder(to_tensor(frames)), level)

    def latents(self, codes: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None,
                level: int | None = None) -> Tensor:
        """Dequantized latents (1, C, H, W). lo/hi: a minmax frame's range (default: the model's);
        level: the step-mode level the codes were made at (default: the model's default level)."""
        minmax = self.cfg.quantizer.mode == "minmax" and lo is not None and hi is not None
        c = torch.from_numpy(np.ascontiguousarray(codes)).float()
        return self.quantizer.dequantize_codes(c, level, lo if minmax else None, hi if minmax else None)[None]

    def neutral_codes(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Codes that mean 'nothing known' (a receiver with no picture yet)."""
        return self.quantizer.neutral_codes(shape)

    @torch.inference_mode()
    def decode_latents(self, y: Tensor) -> np.ndarray:
        return to_uint8(self.decoder(y))[0]

    def decode(self, q: Quantized) -> np.ndarray:
        """Quantized codes -> uint8 (H, W, 3) frame."""
        lo, hi = (q.lo, q.hi) if q.mode == "minmax" else (None, None)
        return self.decode_latents(self.latents(q.codes, lo, hi, q.level))

    # -- frames <-> packets --------------------------------------------------------------------
    def packets(self, frame: np.ndarray, frame_number: int, timestamp_us: int | None = None,
                max_packet_bytes: int | None = None, level: int | None = None) -> list[bytes]:
        """Encode one frame into packets: one, or slices no larger than `max_packet_bytes`."""
        ts = time.time_ns() // 1000 if timestamp_us is None else timestamp_us
        return self.pack(self.encode(frame, level), frame_number, ts, max_packet_bytes)

    def pack(self, q: Quantized, frame_number: int, timestamp_us: int,
             max_packet_bytes: int | None = None) -> list[bytes]:
        """Quantized codes -> packets, range-coded when the model has entropy tables."""
        return bitstream.pack_frame(q, self.model_id, frame_number, timestamp_us, max_packet_bytes,
                                    coder=self.entropy)

    def pack_inter(self, q: Quantized, res: np.ndarray, frame_number: int, timestamp_us: int,
                   max_packet_bytes: int | None = None, ref_frame_number: int | None = None,
                   intra_rows: tuple[int, int] | None = None) -> list[bytes]:
        """A P-frame's codes as packets of residuals `res` against its prediction from frame
        `ref_frame_number` (default: the previous frame; session.py); `intra_rows` (start, stop):
        a band of latent rows sent intra (a refresh)."""
        if self.residual is None:
            raise ValueError("this model has no residual tables: it codes intra frames only")
        return bitstream.pack_inter_frame(q, res, self.model_id, frame_number, timestamp_us, max_packet_bytes,
                                          self.residual, ref_frame_number, self.entropy, intra_rows)

    def pack_conditional(self, payload: bytes, coder_id: int, frame_number: int, timestamp_us: int,
                         shape: tuple[int, int, int], level: int, ref_frame_number: int, reference_crc: int) -> bytes:
        """A learned P-frame's range stream (conditional.encode_frame) as its one packet, named by
        the learned coder's id (`conditional.coder_id`)."""
        return bitstream.pack_conditional(payload, coder_id, frame_number, timestamp_us, shape, self.bits,
                                          level, ref_frame_number, reference_crc)

    def unpack(self, data: bytes, expect_shape: tuple[int, int, int] | None = None,
               learned_id: int | None = None) -> bitstream.Packet:
        """Parse a packet and check it belongs to this model and quantizer (else PacketError;
        `bitstream.ForeignPacketError` for a well-formed packet of another model, quantizer or shape).
        expect_shape: the whole frame's latent (C, H, W) the call makes (`latent_shape`): a
        receiver passes it so a packet claiming another shape is refused before any decoding.
        learned_id: the receiver's learned coder (`conditional.coder_id`); learned P-frames of
        another coder, or any when None, are foreign."""
        return bitstream.unpack(data, expect_model_id=self.model_id, coder=self.entropy,
                                residual_coder=self.residual, expect_shape=expect_shape,
                                check_header=self._check_header, expect_learned_id=learned_id)

    def _check_header(self, h: bitstream.PacketHeader) -> None:
        """This model's quantizer made the packet (checked before its payload is decoded)."""
        if h.bits != self.bits or h.channels != self.cfg.model.latent_channels:
            raise bitstream.ForeignPacketError(
                f"packet has {h.channels} channels x {h.bits} bits; this model makes "
                f"{self.cfg.model.latent_channels} x {self.bits}")
        if h.quant_mode != self.cfg.quantizer.mode:
            raise bitstream.ForeignPacketError(
                f"packet quantizer mode {h.quant_mode}, model's is {self.cfg.quantizer.mode}")
        if not 0 <= h.level < self.levels:
            raise bitstream.ForeignPacketError(
                f"packet at quantizer level {h.level}; this model has levels 0..{self.levels - 1}")

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """The latent (C, H, W) this model makes for a height x width frame (default: the
        model's own square `frame_size`); FrameSizeError for a size it cannot code."""
        height = self.frame_size if height is None else int(height)
        width = height if width is None else int(width)
        self.model.check_size(height, width)
        return model_latent_shape(self.cfg.model, height, width)

    def decode_packet(self, data: bytes) -> tuple[bitstream.PacketHeader, np.ndarray]:
        """A whole-frame packet -> (header, uint8 frame). Sliced frames go through an assembler."""
        p = self.unpack(data)
        if not p.header.is_whole_frame:
            raise PacketError("a slice, not a whole frame: collect slices with a FrameAssembler")
        return p.header, self.decode_latents(self.latents(p.codes, p.lo, p.hi, p.header.level))


def frame_size_ok(height: int, width: int) -> bool:
    return height > 0 and width > 0 and height % STRIDE == 0 and width % STRIDE == 0
