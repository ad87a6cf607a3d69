"""PyTorch eager backend: the folded model (BN in the convs), channels-last, inference mode.

On the CPU it runs float32 (oneDNN picks channels-last conv kernels); on a GPU float16 with
cuDNN autotuning, since tensor cores want half precision and NHWC.
"""

from __future__ import annotations

import torch

from ..codec.codec import NeuralCodec
from .common import BackendError, Runner
from .fold import fold_decoder, fold_encoder

NAME = "eager"
PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp16", "fp32")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def available(device: torch.device) -> str | None:
    return None  # PyTorch itself is all it needs


def default_precision(device: torch.device) -> str:
    return PRECISIONS[device.type][0]


def check_precision(backend: str, device: torch.device, precision: str | None,
                    allowed: dict[str, tuple[str, ...]]) -> str:
    p = precision or allowed[device.type][0]
    if p not in allowed[device.type]:
        raise BackendError(f"backend {backend} on {device.type} runs {', '.join(allowed[device.type])}, "
                           f"not {p}")
    return p


def build(codec: NeuralCodec, device: torch.device, precision: str | None = None, **_: object) -> tuple[Runner, Runner]:
    p = check_precision(NAME, device, precision, PRECISIONS)
    dtype = DTYPES[p]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed frame sizes: autotuned conv algorithms pay off
    enc = fold_encoder(codec.model).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    dec = fold_decoder(codec.model).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return (Runner(enc, device, dtype, contiguous_out=True, name=f"{NAME}-encoder-{p}"),
            Runner(dec, device, dtype, name=f"{NAME}-decoder-{p}"))
