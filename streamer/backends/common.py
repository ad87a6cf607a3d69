"""Pieces every backend shares: the error type, device helpers and the call wrapper.

A backend's encoder and decoder keep the interface of the eager modules they replace:
float32 (N, C, H, W) tensors in, float32 tensors out, on the caller's device (the CPU in this
project: frames come from NumPy and codes go back to NumPy). Moving to a GPU, casting to fp16
and back happens inside the wrapper, so `NeuralCodec` and its quantizer never see the difference.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor

from ..errors import StreamerError

INSTALL_TENSORRT = "pip install .[tensorrt]"  # torch-tensorrt + nvidia-modelopt (pyproject extra)
INSTALL_INT8 = "pip install torchao"


class BackendError(StreamerError):
    """A backend is unknown, unavailable on this machine, or failed to build."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` means the first CUDA GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {dev} asked for, but this torch build sees no CUDA GPU "
                           f"(torch {torch.__version__}, cuda {torch.version.cuda})")
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device {dev}: only cpu and cuda are supported")
    return dev


def dense_strides(shape: tuple[int, ...] | torch.Size, memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides of a dense tensor of `shape` in `memory_format` (NCHW or NHWC for 4-d)."""
    if len(shape) == 4 and memory_format == torch.channels_last:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class Runner:
    """Tensor -> Tensor callable around an inference function.

    Input goes to `device` / `dtype` / `memory_format`; output comes back as float32 on the
    input's device. `context` (e.g. an inductor config patch) is entered around every call, and
    inference mode always: compiled graphs are specialised on grad mode, so one fixed mode means
    one compilation."""

    def __init__(self, fn: Callable[[Tensor], Tensor], device: torch.device, dtype: torch.dtype,
                 channels_last: bool = True, contiguous_out: bool = False,
                 context: Callable[[], ContextManager[Any]] | None = None, name: str = "") -> None:
        self.fn = fn
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.contiguous_out = contiguous_out
        self.context = context or contextlib.nullcontext
        self.name = name

    def __call__(self, x: Tensor) -> Tensor:
        src = x.device
        with self.context(), torch.inference_mode():
            x = x.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
            if x.stride() != dense_strides(x.shape, self.memory_format):
                # contiguous() ignores the stride of a size-1 dimension, but compiled graphs guard
                # on exact strides: a frame from NumPy (`frame[None]`, stride 0) would recompile
                x = x.clone(memory_format=self.memory_format)
            y = self.fn(x)
            y = y.to(src, torch.float32)
            if y.device.type == "cuda" and y.device == src:
                # a CUDA-graph replay ("reduce-overhead") overwrites its output buffer on the next
                # call: hand the caller its own copy when no device transfer made one already
                y = y.clone()
            # latents are small and go to the quantizer: give it plain NCHW; pictures stay
            # channels-last, which is already the (N, H, W, 3) order `to_uint8` wants
            return y.contiguous() if self.contiguous_out else y

    def __repr__(self) -> str:
        return f"Runner({self.name}, device={self.device}, dtype={self.dtype})"


def cpp_compiler() -> str | None:
    """The C++ compiler TorchInductor would use on the CPU, or None when there is none."""
    import shutil

    for cxx in ("g++", "c++", "clang++"):
        if shutil.which(cxx):
            return cxx
    return None
