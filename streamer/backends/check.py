"""How closely a backend reproduces the eager float32 model: latents, codes and pictures.

`compare` runs the same frames through the model's own eager modules (the reference) and
through the codec's current encoder/decoder, and reports:

- latent_max_abs: largest |latent difference| before quantization;
- codes_equal / codes_within_1: share of quantized codes that are identical / off by at most one
  level (a code flips when a latent sits near a rounding boundary, so even fp32 reorderings flip
  a few; int8 flips more);
- decoder_psnr: the backend's decoder against the reference decoder on the *same* (reference)
  codes, in dB over uint8 pictures: the decoder's error alone;
- psnr_reference / psnr_backend: the whole path (encode, quantize, decode) against the original
  frames; `psnr_drop` = reference - backend is the quality a user loses to the backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..codec.codec import NeuralCodec, to_tensor, to_uint8
from ..metrics import psnr


@dataclass
class Agreement:
    backend: str
    frames: int
    latent_max_abs: float
    codes_equal: float
    codes_within_1: float
    decoder_psnr: float
    psnr_reference: float
    psnr_backend: float

    @property
    def psnr_drop(self) -> float:
        return self.psnr_reference - self.psnr_backend

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["psnr_drop"] = self.psnr_drop
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


@torch.inference_mode()
def compare(codec: NeuralCodec, frames: np.ndarray, batch: int = 8) -> Agreement:
    """Agreement of `codec`'s backend with its model's eager float32 modules on uint8 (N, H, W, 3) frames."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    q = codec.quantizer
    ref_enc, ref_dec = codec.model.encoder, codec.model.decoder
    max_abs, equal, within, count = 0.0, 0, 0, 0
    ref_out, dec_out, path_out = [], [], []
    for i in range(0, len(frames), batch):
        x = to_tensor(frames[i:i + batch])
        y_ref, y_new = ref_enc(x), codec.encoder(x)
        max_abs = max(max_abs, float((y_ref - y_new).abs().max()))
        c_ref = torch.from_numpy(np.stack([r.codes for r in q.quantize(y_ref)])).int()
        c_new = torch.from_numpy(np.stack([r.codes for r in q.quantize(y_new)])).int()
        equal += int((c_ref == c_new).sum())
        within += int(((c_ref - c_new).abs() <= 1).sum())
        count += c_ref.numel()
        yq_ref, yq_new = q(y_ref), q(y_new)  # quantize + dequantize, as the receiver sees them
        ref_out.append(to_uint8(ref_dec(yq_ref)))
        dec_out.append(to_uint8(codec.decoder(yq_ref)))
        path_out.append(to_uint8(codec.decoder(yq_new)))
    ref, dec, path = (np.concatenate(a) for a in (ref_out, dec_out, path_out))
    return Agreement(backend=codec.backend, frames=len(frames), latent_max_abs=max_abs,
                     codes_equal=equal / count, codes_within_1=within / count,
                     decoder_psnr=psnr(dec, ref), psnr_reference=psnr(ref, frames), psnr_backend=psnr(path, frames))
