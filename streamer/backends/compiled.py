"""`torch.compile` backend: TorchInductor on the folded model.

CPU: inductor generates C++/OpenMP kernels (it needs a C++ compiler) with *freezing* on, so
weights become constants and convs get oneDNN's prepacked weights; the pads, ReLUs, residual
adds and pixel shuffles fuse into few loops. GPU: float16 and mode "reduce-overhead", which
replays the whole network as one CUDA graph (launch overhead dominates at these sizes).

Graphs are specialised per input shape (`dynamic=False`): a call has one frame size and batch,
and the first call at each new shape compiles (tens of seconds on a small CPU; cached on disk
by inductor afterwards).
"""

from __future__ import annotations

import torch

from ..codec.codec import NeuralCodec
from .common import BackendError, Runner, cpp_compiler
from .eager import DTYPES, check_precision
from .fold import fold_decoder, fold_encoder

NAME = "compile"
PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp16", "fp32")}


def available(device: torch.device) -> str | None:
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
    if device.type == "cpu" and cpp_compiler() is None:
        return "TorchInductor on the CPU needs a C++ compiler (install g++)"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - very old torch
            return "torch.utils._triton is missing"
        if not has_triton():
            return "TorchInductor on CUDA needs Triton (pip install triton)"
    return None


def inductor_context(**patches: object):  # type: ignore[no-untyped-def]
    """An inductor config patch for this call only (other compiles are untouched). Options this
    torch's inductor does not know are dropped, so an older torch compiles without them."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({k: v for k, v in patches.items() if hasattr(inductor_config, k)})


def freezing_context():  # type: ignore[no-untyped-def]
    """Inductor freezing (weights become constants, convs get prepacked oneDNN weights).

    Passing it as torch.compile(options=...) does not reach the constant folding that prepacks
    int8 conv weights (torch 2.13 fails in fake-tensor mode), a config patch around the call does.
    """
    return inductor_context(freezing=True)


RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Each (frame size, batch) is its own graph, and dynamo counts graphs per code object: all
    folded encoders share nn.Sequential.forward, so a benchmark over presets x sizes x batches
    passes the default limit of 8 and dynamo would silently fall back to eager. Raise it (never
    lower it): this is process-wide."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name) < limit:
        setattr(dynamo_config, name, limit)


def compile_module(module: torch.nn.Module, device: torch.device) -> tuple[object, object]:
    """(compiled callable, context factory to enter around each call)."""
    if device.type == "cuda":
        return torch.compile(module, mode="reduce-overhead", dynamic=False), None
    return torch.compile(module, dynamic=False), freezing_context


def build(codec: NeuralCodec, device: torch.device, precision: str | None = None, **_: object) -> tuple[Runner, Runner]:
    reason = available(device)
    if reason:
        raise BackendError(f"backend {NAME} is unavailable: {reason}")
    p = check_precision(NAME, device, precision, PRECISIONS)
    dtype = DTYPES[p]
    raise_recompile_limit()
    runners = []
    # "cat" padding: inductor in torch 2.13 cannot compile a replicate pad after a pixel shuffle
    for part, fold in (("encoder", fold_encoder), ("decoder", fold_decoder)):
        module = fold(codec.model, pad_mode="cat").to(device=device, dtype=dtype, memory_format=torch.channels_last)
        fn, ctx = compile_module(module, device)
        runners.append(Runner(fn, device, dtype, contiguous_out=part == "encoder", context=ctx,  # type: ignore[arg-type]
                              name=f"{NAME}-{part}-{p}"))
    return runners[0], runners[1]

