"""INT8 backend for x86 CPUs: PyTorch's PT2E post-training quantization, run by TorchInductor.

Flow (per encoder / decoder, on the BN-folded model):
  torch.export (batch and frame size dynamic) -> prepare_pt2e with X86InductorQuantizer
  (int8 per-channel symmetric weights, uint8 per-tensor activations) -> calibrate on real frames
  -> convert_pt2e -> torch.compile with inductor *freezing*, which fuses each
  dequantize -> conv -> quantize pattern into one oneDNN int8 conv with prepacked weights.

Without the compile step the converted graph runs reference (fake-quantized) float kernels and
is slower than float32, and the torchao `lower_pt2e_quantized_to_x86` path (oneDNN ops, no
codegen) measured slower than folded float32 eager here, so compile is part of the backend.

Between the int8 convs sit the replicate pads (edge slices + concat, see `fold.ReplicatePad`)
and the re-quantization of each conv's float output. On the CPU inductor lowers each concat to a
buffer of its own by default, so one pad costs three passes over the activation (width-padded
float, fully padded float, uint8). `force_pointwise_cat` makes the pads and the quantize one
loop: measured on the 2-core AVX2 build machine (all-int8 graphs), the 224x224 decoder went
from 8.1 to 6.7 ms and encode + decode from 1.56x to 1.81x the eager float32 model. The decoder
is folded with block pixel shuffles (`fold.BlockPixelShuffle`): contiguous channel reads in those
loops, 0.7 ms less per 224x224 decode.

Calibration data: the encoder sees frames (the sample clip, or frames passed in); the decoder
sees what it gets in a call, the quantized-then-dequantized latents of those frames.

Float32 convs (`FLOAT_LAYERS`, `float_convs`): the linear block path's (one per part; they
carry most of the picture and cost little), the encoder's first (three input channels: int8
gains little there, and 7-bit input pixels cost code agreement) and last (it writes the latents
the codec quantizes). The decoder's convolutional path, a correction added to the linear path's
picture, runs all int8. On this AVX2 CPU without VNNI the activations are 7-bit (see
`cpu_has_vnni`). Measured on 288 val frames (speakers other than the calibration clip's) with
the default model of 23 Nov 16:23 (`lite` with the linear path), `python -m streamer.bench codec
--backend int8 --sizes 224 --batch 1 --quality-clips ../shared/data/val/video`:

| float32 convs (besides the linear path) | codes equal | decoder vs eager | PSNR drop | speed vs eager fp32 |
|-----------------------------------------|-------------|------------------|-----------|---------------------|
| none (all int8)                         | 65.4 %      | 47.9 dB          | 4.69 dB   | 1.71x               |
| encoder first + last (the backend)      | 96.5 %      | 47.9 dB          | 0.26 dB   | 1.49-1.59x (4 runs) |
| encoder first + last, decoder last 2    | 96.5 %      | 48.2 dB          | 0.23 dB   | 1.37x               |

(model calls only, one thread, a shared machine: the eager baseline itself moved between 21.6
and 32 ms across these runs.) Keeping the decoder's last two convs float32 buys 0.03 dB and
costs about 0.2x of speedup; the encoder's last conv is what int8 must not touch. With the previous
`lite` (no linear path) the decoder's last two convs had to stay float32 (all-int8 lost up to
3 dB) and int8 reached 1.36x.
8-bit activations (no reduce_range) on this CPU saturate oneDNN's 16-bit pair sums and lost up
to 2.8 dB.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..codec.codec import NeuralCodec, to_tensor
from .calibration import sample_frames
from .common import INSTALL_INT8, BackendError, Runner, cpp_compiler
from .compiled import inductor_context, raise_recompile_limit
from .fold import fold_decoder, fold_encoder

NAME = "int8"
CALIBRATION_BATCH = 8


def int8_context():  # type: ignore[no-untyped-def]
    """Inductor options around every int8 call: freezing (prepacked int8 weights, fused
    dequantize-conv-quantize) and pointwise concats (one loop per pad, see above)."""
    return inductor_context(freezing=True, force_pointwise_cat=True)


@contextlib.contextmanager
def _quiet_import():  # type: ignore[no-untyped-def]
    """torchao logs a warning per CUDA-only extension it cannot load on a CPU build, and torch
    one per deprecated pytree registration; neither matters to a CPU int8 model."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def pt2e_api() -> tuple[Callable[..., Any], Callable[..., Any], Any, Callable[[], Any]]:
    """(prepare_pt2e, convert_pt2e, X86InductorQuantizer, default config) or ImportError."""
    with _quiet_import():
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
        except ImportError:
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e  # type: ignore[no-redef]
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq  # type: ignore[no-redef]
    return prepare_pt2e, convert_pt2e, xiq.X86InductorQuantizer, xiq.get_default_x86_inductor_quantization_config


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX): its int8 dot products accumulate
    u8 x s8 in 32 bits. Without it (plain AVX2 / AVX-512F) oneDNN uses pairwise 16-bit
    accumulation, which saturates with full-range 8-bit activations; measured on the AVX2 build
    machine, 4x the latent error of the emulated int8 graph."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False  # unknown: 7-bit activations are safe everywhere


def available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the int8 backend runs on x86 CPUs; on an NVIDIA GPU use tensorrt with precision int8"
    cap = torch.backends.cpu.get_cpu_capability()
    if not cap.startswith("AVX"):
        return f"needs an x86 CPU with AVX2 or AVX-512 for oneDNN int8 kernels (this CPU: {cap})"
    try:
        pt2e_api()
    except ImportError as e:
        return f"PT2E quantization is not importable ({e}); {INSTALL_INT8}"
    if cpp_compiler() is None:
        return "int8 kernels are generated by TorchInductor, which needs a C++ compiler (install g++)"
    return None


def _dynamic_shapes(stride: int) -> tuple[dict[int, Any], ...]:
    """Batch and frame size free. Sides are multiples of `stride` (8 for the encoder's frames, 1
    for the decoder's latents) and at least 2 latent rows, so no layer sees a side of 1 (export
    would otherwise specialise on it)."""
    from torch.export import Dim

    h, w = Dim("rows", min=2, max=1024), Dim("cols", min=2, max=1024)
    return ({0: Dim("batch", min=1, max=1024), 2: h * stride if stride > 1 else h,
             3: w * stride if stride > 1 else w},)


def quantize_module(module: nn.Module, batches: list[Tensor], stride: int = 1, reduce_range: bool | None = None,
                    float_layers: tuple[str, ...] = ()) -> torch.fx.GraphModule:
    """Export, annotate, calibrate on `batches` (float NCHW) and convert: the int8 graph.

    reduce_range: 7-bit activations (default: when the CPU lacks VNNI, see `cpu_has_vnni`).
    float_layers: names of modules (as in `module.named_modules()`) left in float32."""
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    prepare_pt2e, convert_pt2e, quantizer_cls, default_config = pt2e_api()
    example = batches[0][:2] if batches[0].shape[0] >= 2 else batches[0].expand(2, -1, -1, -1)
    # batch 2 in the example: a batch of 1 would be specialised to 1 by export
    with _quiet_import():
        graph = torch.export.export(module.eval(), (example.contiguous(),), dynamic_shapes=_dynamic_shapes(stride)).module()
        quantizer = quantizer_cls()
        quantizer.set_global(default_config(reduce_range=reduce_range))
        for name in float_layers:
            quantizer.set_module_name_qconfig(name, None)
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for b in batches:
                prepared(b)
        return convert_pt2e(prepared)


def calibration_batches(codec: NeuralCodec, frames: np.ndarray | None) -> tuple[list[Tensor], list[Tensor]]:
    """(encoder inputs, decoder inputs) in batches of `CALIBRATION_BATCH`."""
    if frames is None:
        frames = sample_frames(min(codec.frame_size, 288))
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise BackendError(f"calibration frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    codec.model.check_size(frames.shape[1], frames.shape[2])
    xs, ys = [], []
    with torch.inference_mode():
        for i in range(0, len(frames), CALIBRATION_BATCH):
            x = to_tensor(frames[i:i + CALIBRATION_BATCH]).contiguous()
            xs.append(x)
            ys.append(codec.quantizer(codec.model.encoder(x)).contiguous())  # what the decoder receives
    # inference-mode tensors cannot enter export's tracing: clone them out
    return [x.clone() for x in xs], [y.clone() for y in ys]


FLOAT_LAYERS = {"encoder": (0, -1), "decoder": ()}  # conv indices kept float32, see above


def float_convs(module: nn.Module, part: str) -> tuple[str, ...]:
    """Names (as in `module.named_modules()`) of the convs of `part` that stay float32: the
    linear block path's (it carries most of the picture, and costs little), and the convolutional
    path's `FLOAT_LAYERS`."""
    convs = [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    linear = [n for n in convs if n.startswith("linear.")]
    net = [n for n in convs if not n.startswith("linear.")]
    if len(net) < 3:
        return tuple(convs)
    return tuple(dict.fromkeys([net[i] for i in FLOAT_LAYERS[part]] + linear))


def build(codec: NeuralCodec, device: torch.device, precision: str | None = None,
          calibration_frames: np.ndarray | None = None, **_: object) -> tuple[Runner, Runner]:
    reason = available(device)
    if reason:
        raise BackendError(f"backend {NAME} is unavailable: {reason}")
    if precision not in (None, "int8"):
        raise BackendError(f"backend {NAME} runs int8, not {precision}")
    xs, ys = calibration_batches(codec, calibration_frames)
    raise_recompile_limit()
    runners = []
    for part, module, batches in (("encoder", fold_encoder(codec.model, pad_mode="cat"), xs),
                                  ("decoder", fold_decoder(codec.model, pad_mode="cat", shuffle="block"), ys)):
        try:
            graph = quantize_module(module, batches, stride=8 if part == "encoder" else 1,
                                    float_layers=float_convs(module, part))
        except Exception as e:  # export / quantizer failures name no layer a user can act on
            raise BackendError(f"int8 quantization of the {part} failed: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from e
        fn = torch.compile(graph, dynamic=False)
        runners.append(Runner(fn, device, torch.float32, contiguous_out=part == "encoder",
                              context=int8_context, name=f"{NAME}-{part}"))
    return runners[0], runners[1]
