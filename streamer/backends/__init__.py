"""Inference backends for the codec's encoder and decoder, behind one interface.

    codec = NeuralCodec.load("default")
    apply_backend(codec, "auto")          # or eager | compile | int8 | tensorrt
    codec.encode(frame)                   # same API, faster callables underneath

A backend replaces `codec.encoder` / `codec.decoder` (Tensor -> Tensor callables) and sets
`codec.backend` to its name; the quantizer, packets and model id do not change, so a sender on
one backend talks to a receiver on another.

| name     | where      | what                                                                  |
|----------|------------|-----------------------------------------------------------------------|
| eager    | CPU, CUDA  | BN folded into convs, channels-last, inference mode; fp16 on a GPU     |
| compile  | CPU, CUDA  | torch.compile: inductor + freezing on CPU, "reduce-overhead" on a GPU  |
| int8     | x86 CPU    | PT2E int8 (X86InductorQuantizer), calibrated on real frames, inductor; |
|          |            | the 4 precision-sensitive convs stay float32 (see `int8`)               |
| tensorrt | CUDA       | Torch-TensorRT dynamo, fp16 (or int8 via ModelOpt), engines cached     |

`auto` picks, in order, the first available of `AUTO_ORDER[device type]`:
CUDA: tensorrt, compile, eager; CPU: int8, eager. `compile` is left out of the CPU order: on the
2-core build machine it measured no faster than folded eager (0.9-1.05x the unfolded eager
model, folded eager 1.05-1.3x, int8 1.4-2x; `python -m streamer.bench codec --backend all`) and
costs ~10 s of compilation at start.

`apply_backend` runs each new encoder and decoder once on a frame of the codec's size before it
returns (`warmup=True`): compiled backends compile there rather than on the first frame of a
call, and a backend that builds but cannot run (no working C++ toolchain, an inductor bug)
fails there, where `auto` can still fall back to the next one.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..codec.codec import NeuralCodec
from . import compiled, eager, int8, tensorrt
from .check import Agreement, compare
from .common import INSTALL_INT8, INSTALL_TENSORRT, BackendError, Runner, resolve_device

__all__ = ["BackendError", "BACKENDS", "CHOICES", "AUTO_ORDER", "apply_backend", "available_backends",
           "resolve_backend", "warm_up", "add_backend_arguments", "apply_backend_from_args", "Runner",
           "Agreement", "compare"]

log = logging.getLogger(__name__)

_MODULES: dict[str, ModuleType] = {"eager": eager, "compile": compiled, "int8": int8, "tensorrt": tensorrt}
BACKENDS: tuple[str, ...] = tuple(_MODULES)
CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("tensorrt", "compile", "eager"), "cpu": ("int8", "eager")}
INSTALL_HINTS: dict[str, str] = {"tensorrt": INSTALL_TENSORRT, "int8": INSTALL_INT8}


def available_backends(device: str | torch.device | None = None) -> dict[str, str | None]:
    """Backend name -> None when it can run on `device` (default: CUDA if present, else CPU),
    else the reason it cannot, with what to install."""
    dev = resolve_device(device)
    return {name: mod.available(dev) for name, mod in _MODULES.items()}


def resolve_backend(name: str, device: str | torch.device | None = None) -> str:
    """The concrete backend `name` means on `device`; "auto" becomes the first available in
    `AUTO_ORDER`. Raises `BackendError` for an unknown or unavailable name."""
    dev = resolve_device(device)
    if name == "auto":
        avail = available_backends(dev)
        for candidate in AUTO_ORDER[dev.type]:
            if avail[candidate] is None:
                return candidate
        return "eager"
    if name not in _MODULES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    reason = _MODULES[name].available(dev)
    if reason:
        raise BackendError(f"backend {name!r} is unavailable on {dev.type}: {reason}")
    return name


def warm_up(codec: NeuralCodec, encoder: Any, decoder: Any, batch: int = 1) -> None:
    """One encode and decode of a mid-grey frame batch at the codec's frame size."""
    side = codec.frame_size
    with torch.inference_mode():
        y = encoder(torch.full((batch, 3, side, side), 0.5))
        expect = (batch, codec.cfg.model.latent_channels, side // 8, side // 8)
        if tuple(y.shape) != expect:
            raise BackendError(f"encoder made latents of shape {tuple(y.shape)}, expected {expect}")
        x = decoder(codec.quantizer(y))
        if tuple(x.shape) != (batch, 3, side, side):
            raise BackendError(f"decoder made pictures of shape {tuple(x.shape)}, expected {(batch, 3, side, side)}")


def apply_backend(codec: NeuralCodec, name: str, *, calibration_frames: np.ndarray | None = None,
                  cache_dir: Path | None = None, device: str | torch.device | None = None,
                  precision: str | None = None, warmup: bool = True) -> NeuralCodec:
    """Swap `codec.encoder` / `codec.decoder` for backend `name` and set `codec.backend`.

    calibration_frames: uint8 (N, H, W, 3) frames for the int8 backends (default: the bundled
        sample clip, centre-cropped to the model's frame size).
    cache_dir: where TensorRT engines are kept (default: ~/.cache/neural-video-call/tensorrt).
    device: "cpu" or "cuda[:n]"; default CUDA when present.
    precision: "fp32" | "fp16" | "int8" where the backend offers a choice (default: the fastest
        that keeps quality: fp16 on GPUs, fp32 eager/compile on CPUs, int8 for int8).
    warmup: run encoder and decoder once at the codec's frame size (batch 1) before returning,
        so compilation happens here and a backend that cannot run fails here.
    Returns the same codec, for chaining. With "auto", a backend that fails to build (or to warm
    up) is logged and the next in order is tried; a named backend that fails raises `BackendError`.
    """
    dev = resolve_device(device)
    concrete = resolve_backend(name, dev)
    order = [concrete]
    if name == "auto":
        order += [b for b in AUTO_ORDER[dev.type] if b != concrete and b in _MODULES
                  and AUTO_ORDER[dev.type].index(b) > AUTO_ORDER[dev.type].index(concrete)]
        if "eager" not in order:
            order.append("eager")
    last: Exception | None = None
    for backend in order:
        try:
            enc, dec = _MODULES[backend].build(codec, dev, precision=precision,
                                               calibration_frames=calibration_frames, cache_dir=cache_dir)
            if warmup:
                warm_up(codec, enc, dec)
        except BackendError as e:
            if name != "auto":
                raise
            log.warning("auto backend: %s failed (%s); trying the next", backend, e)
            last = e
            continue
        except Exception as e:
            if name != "auto":
                raise BackendError(f"backend {backend!r} failed to build: {type(e).__name__}: {e}") from e
            log.warning("auto backend: %s failed (%s: %s); trying the next", backend, type(e).__name__, e)
            last = e
            continue
        codec.encoder, codec.decoder, codec.backend = enc, dec, backend
        return codec
    raise BackendError(f"no backend could be built on {dev.type}: {last}")  # pragma: no cover


# -- command line -------------------------------------------------------------------------------

def add_backend_arguments(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """--backend, --backend-precision, --backend-cache: the same flags on sender, receiver and evaluation."""
    parser.add_argument("--backend", choices=CHOICES, default=default,
                        help="encoder/decoder runtime: auto (TensorRT on an NVIDIA GPU, else int8 on an "
                             f"x86 CPU, else eager), {', '.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--backend-precision", choices=("fp32", "fp16", "int8"), default=None,
                        help="precision for backends that offer a choice (default: the backend's own)")
    parser.add_argument("--backend-cache", type=Path, default=None,
                        help="TensorRT engine cache directory (default: ~/.cache/neural-video-call/tensorrt)")


def apply_backend_from_args(codec: NeuralCodec, args: argparse.Namespace, **kwargs: Any) -> NeuralCodec:
    return apply_backend(codec, args.backend, precision=getattr(args, "backend_precision", None),
                         cache_dir=getattr(args, "backend_cache", None), **kwargs)
