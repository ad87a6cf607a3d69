"""TensorRT backend through Torch-TensorRT's dynamo path, with an on-disk engine cache.

Build (per encoder / decoder and per input shape): the BN-folded module is exported with
`torch.export` (`export_for_tensorrt`, the graph the CPU tests check), then
`torch_tensorrt.dynamo.compile(exported_program, inputs=[example], enabled_precisions=...)`
turns it into a GraphModule that runs TensorRT engines.
Precisions: "fp16" (default; the module and its inputs are cast to half), "fp32", and "int8",
where NVIDIA ModelOpt (`mtq.quantize` with `INT8_DEFAULT_CFG`) inserts calibrated
quantize/dequantize nodes that TensorRT turns into int8 layers.

Building an engine takes seconds to minutes, so each one is saved with `torch_tensorrt.save`
(an ExportedProgram file) and reloaded with `torch.export.load(path).module()` on the next
start. The cache key names everything that makes an engine invalid when it changes: the model
(`codec.model_id`: architecture, quantizer and every weight), the part, the input shape, the
precision, the GPU (name and compute capability) and the versions of torch, CUDA, torch-tensorrt
and TensorRT (and ModelOpt for int8). A changed key is a different file; a file whose sidecar key
does not match, or that fails to load, is rebuilt; and when an engine is built, the engines of
the same model, part, shape, precision and GPU that an older library version or cache format
built are deleted (nothing on this install can use them again).

Everything but `build_engine` / `save_engine` / `load_engine` runs without TensorRT and is tested
on the CPU; those three follow the Torch-TensorRT documentation and need an NVIDIA GPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..codec.codec import NeuralCodec
from .common import INSTALL_TENSORRT, BackendError, Runner
from .fold import fold_decoder, fold_encoder

NAME = "tensorrt"
PRECISIONS = ("fp16", "fp32", "int8")
CACHE_FORMAT = 1  # bump when the file layout or the build recipe changes
log = logging.getLogger(__name__)

TensorFn = Callable[[Tensor], Tensor]


# -- availability --------------------------------------------------------------------------

def available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"TensorRT needs an NVIDIA GPU with CUDA (device here: {device.type}); {INSTALL_TENSORRT} on a GPU machine"
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as e:
        return f"torch-tensorrt is not importable ({e}); {INSTALL_TENSORRT}"
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def library_versions(precision: str) -> dict[str, str]:
    """Every library whose version changes the engine it would build."""
    v = {"torch": torch.__version__, "cuda": str(torch.version.cuda),
         "torch_tensorrt": _version("torch-tensorrt"), "tensorrt": _version("tensorrt")}
    if v["tensorrt"] == "absent":  # NVIDIA ships it under per-CUDA names too
        for dist in ("tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs"):
            if _version(dist) != "absent":
                v["tensorrt"] = _version(dist)
                break
    if precision == "int8":
        v["modelopt"] = _version("nvidia-modelopt")
    return v


def gpu_name(device: torch.device) -> str:
    """The GPU's name and compute capability: an engine is tuned for one GPU model."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "none"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


# -- cache -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineKey:
    """What an engine was built for. Any difference means the engine cannot be reused."""

    part: str  # "encoder" | "decoder"
    model_id: int
    input_shape: tuple[int, ...]
    precision: str
    gpu: str
    versions: tuple[tuple[str, str], ...]
    cache_format: int = CACHE_FORMAT

    @classmethod
    def make(cls, part: str, model_id: int, input_shape: Iterable[int], precision: str, gpu: str,
             versions: dict[str, str]) -> "EngineKey":
        return cls(part, int(model_id), tuple(int(s) for s in input_shape), precision, gpu,
                   tuple(sorted(versions.items())))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["versions"] = dict(self.versions)
        d["model_id"] = f"{self.model_id:08x}"
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def filename(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        return f"{self.part}-{self.model_id:08x}-{shape}-{self.precision}-{self.digest()}.ep"


def default_cache_dir() -> Path:
    """$STREAMER_CACHE_DIR/tensorrt, else $XDG_CACHE_HOME (or ~/.cache)/neural-video-call/tensorrt."""
    if os.environ.get("STREAMER_CACHE_DIR"):
        return Path(os.environ["STREAMER_CACHE_DIR"]) / "tensorrt"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "neural-video-call" / "tensorrt"


class EngineCache:
    """Engines on disk, one file per `EngineKey` plus a JSON sidecar holding the key.

    `build`, `save` and `load` are passed in, so the bookkeeping is testable with any
    serialisable stand-in for an engine (tests use plain exported programs on the CPU)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.events: list[tuple[str, str]] = []  # (event, filename): "hit", "built", "rebuilt"

    def path(self, key: EngineKey) -> Path:
        return self.root / key.filename()

    def _sidecar(self, key: EngineKey) -> Path:
        return self.path(key).with_suffix(".json")

    def lookup(self, key: EngineKey, load: Callable[[Path], TensorFn]) -> TensorFn | None:
        """The cached engine for `key`, or None (missing, another key's file, or unloadable)."""
        path, side = self.path(key), self._sidecar(key)
        if not path.exists() or not side.exists():
            return None
        try:
            stored = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if stored != key.to_dict():
            return None
        try:
            return load(path)
        except Exception as e:  # a truncated or foreign file: rebuild rather than fail the call
            log.warning("cached engine %s does not load (%s); rebuilding", path.name, e)
            return None

    def get(self, key: EngineKey, build: Callable[[], Any], save: Callable[[Any, Path], None],
            load: Callable[[Path], TensorFn]) -> TensorFn:
        """Load the engine for `key`, or build it, save it and return it."""
        found = self.lookup(key, load)
        if found is not None:
            self.events.append(("hit", key.filename()))
            return found
        stale = self.path(key).exists()
        engine = build()
        self.root.mkdir(parents=True, exist_ok=True)
        # write to a temporary name, then rename: a crash never leaves a half-written engine
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".ep.tmp")
        os.close(fd)
        try:
            save(engine, Path(tmp))
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._sidecar(key).write_text(json.dumps(key.to_dict(), indent=1, sort_keys=True) + "\n")
        self.events.append(("rebuilt" if stale else "built", key.filename()))
        for old in self.obsolete(key):
            self.events.append(("removed", old.name))
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        return engine

    def obsolete(self, key: EngineKey) -> list[Path]:
        """Engines `key` supersedes: same model, part, shape, precision and GPU, built by other
        library versions or another cache format (or with an unreadable sidecar)."""
        out = []
        same = ("part", "model_id", "input_shape", "precision", "gpu")
        want = key.to_dict()
        for path in self.entries():
            if path == self.path(key):
                continue
            try:
                stored = json.loads(path.with_suffix(".json").read_text())
            except (OSError, json.JSONDecodeError):
                if path.name.startswith(f"{key.part}-{key.model_id:08x}-"):
                    out.append(path)
                continue
            if all(stored.get(k) == want[k] for k in same) and stored != want:
                out.append(path)
        return out

    def entries(self) -> list[Path]:
        return sorted(self.root.glob("*.ep")) if self.root.exists() else []


# -- the graph TensorRT is given ---------------------------------------------------------------

def folded_parts(codec: NeuralCodec) -> dict[str, nn.Module]:
    # "cat" padding: slices + concat convert to TensorRT everywhere; it needs no pad converter
    return {"encoder": fold_encoder(codec.model, pad_mode="cat"),
            "decoder": fold_decoder(codec.model, pad_mode="cat")}


def input_shape(codec: NeuralCodec, part: str, batch: int, size: int) -> tuple[int, int, int, int]:
    if part == "encoder":
        return (batch, 3, size, size)
    side = size // 8
    return (batch, codec.cfg.model.latent_channels, side, side)


def export_for_tensorrt(module: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """The static-shape ExportedProgram TensorRT compiles (one engine per input shape). Non-strict
    tracing, as Torch-TensorRT's ModelOpt example exports the quantized module."""
    return torch.export.export(module.eval(), (example,), strict=False)


# -- TensorRT-only steps ------------------------------------------------------------------------

def engine_example(shape: tuple[int, ...], precision: str, device: torch.device) -> Tensor:
    """The example input an engine is built, saved and keyed for: fp16 engines take half inputs."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return torch.rand(shape, device=device, dtype=torch.float32).to(dtype)


def build_engine(module: nn.Module, example: Tensor, precision: str,
                 calibration: list[Tensor] | None = None) -> nn.Module:
    """Compile a copy of `module` for `example`'s shape (and dtype: half for "fp16") into a
    TensorRT-backed GraphModule: export, then torch_tensorrt.dynamo.compile, as in
    Torch-TensorRT's documented dynamo and ModelOpt PTQ examples."""
    import torch_tensorrt

    module = copy.deepcopy(module).eval().to(example.device)  # quantize / half() work in place
    if precision == "int8":
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.utils import export_torch_mode

        batches = calibration or [example]

        def forward_loop(m: nn.Module) -> None:
            with torch.no_grad():
                for b in batches:
                    m(b.to(example.device))

        mtq.quantize(module, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
        with torch.no_grad(), export_torch_mode():  # ModelOpt's QDQ nodes as exportable ops
            program = export_for_tensorrt(module, example)
            return torch_tensorrt.dynamo.compile(program, inputs=[example], enabled_precisions={torch.int8},
                                                 min_block_size=1)
    if precision == "fp16":
        module = module.half()
    with torch.no_grad():
        program = export_for_tensorrt(module, example)
        return torch_tensorrt.dynamo.compile(program, inputs=[example], enabled_precisions={example.dtype},
                                             min_block_size=1)


def save_engine(engine: nn.Module, path: Path, example: Tensor) -> None:
    import torch_tensorrt

    torch_tensorrt.save(engine, str(path), output_format="exported_program", inputs=[example])


def load_engine(path: Path) -> TensorFn:
    import torch_tensorrt  # noqa: F401  registers the TensorRT runtime ops the saved program calls

    return torch.export.load(str(path)).module()


# -- backend -----------------------------------------------------------------------------------

class ShapeEngines:
    """One engine per input shape, each loaded from the cache or built on first use."""

    def __init__(self, codec: NeuralCodec, part: str, module: nn.Module, precision: str, device: torch.device,
                 cache: EngineCache, calibration: list[Tensor] | None) -> None:
        self.codec, self.part, self.module = codec, part, module
        self.precision, self.device, self.cache, self.calibration = precision, device, cache, calibration
        self.engines: dict[tuple[int, ...], TensorFn] = {}
        self.versions = library_versions(precision)
        self.gpu = gpu_name(device)

    def key(self, shape: tuple[int, ...]) -> EngineKey:
        return EngineKey.make(self.part, self.codec.model_id, shape, self.precision, self.gpu, self.versions)

    def engine(self, shape: tuple[int, ...]) -> TensorFn:
        if shape not in self.engines:
            # a new shape can first appear inside the Runner's inference mode, where export
            # cannot trace: build (and make the example) outside it
            with torch.inference_mode(False):
                example = engine_example(shape, self.precision, self.device)
                self.engines[shape] = self.cache.get(
                    self.key(shape),
                    build=lambda: build_engine(self.module, example, self.precision, self.calibration),
                    save=lambda eng, path: save_engine(eng, path, example),
                    load=load_engine)
        return self.engines[shape]

    def __call__(self, x: Tensor) -> Tensor:
        return self.engine(tuple(x.shape))(x)


def build(codec: NeuralCodec, device: torch.device, precision: str | None = None,
          calibration_frames: np.ndarray | None = None, cache_dir: str | Path | None = None,
          **_: object) -> tuple[Runner, Runner]:
    reason = available(device)
    if reason:
        raise BackendError(f"backend {NAME} is unavailable: {reason}")
    p = precision or "fp16"
    if p not in PRECISIONS:
        raise BackendError(f"backend {NAME} runs {', '.join(PRECISIONS)}, not {p}")
    cache = EngineCache(cache_dir if cache_dir is None else Path(cache_dir))
    calib: dict[str, list[Tensor] | None] = {"encoder": None, "decoder": None}
    if p == "int8":
        from .int8 import calibration_batches

        xs, ys = calibration_batches(codec, calibration_frames)
        calib = {"encoder": xs, "decoder": ys}
    dtype = torch.float16 if p == "fp16" else torch.float32
    runners = []
    for part, module in folded_parts(codec).items():
        engines = ShapeEngines(codec, part, module, p, device, cache, calib[part])
        engines.engine(input_shape(codec, part, 1, codec.frame_size))  # build now, not on the first frame
        runners.append(Runner(engines, device, dtype, channels_last=False, contiguous_out=part == "encoder",
                              name=f"{NAME}-{part}-{p}"))
    return runners[0], runners[1]
