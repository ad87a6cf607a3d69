"""Weights on disk: `<name>.safetensors` (tensors only, no code) beside `<name>.json` (config).

The JSON names the architecture and the quantizer, so a file alone rebuilds the whole codec:

    {"format": "neural-video-codec", "format_version": 1, "preset": "lite",
     "model": {...ModelConfig fields}, "quantizer": {"bits": 6, "mode": "fixed", "lo": [...], "hi": [...]},
     "frame_size": 224, "training": {...free-form provenance}}

Models with entropy coding also hold their probability tables in the safetensors file (key
`entropy.counts`, (levels, channels, contexts, 256) symbol counts, see `entropy.py`); they are part of
the model id like every weight.

Pickled checkpoints (.pt/.pth/.ckpt/.pkl) are refused: unpickling runs arbitrary code.

Both files are untrusted input. `load` turns anything malformed into `WeightsError` before it
builds a tensor or does slow work: files are read only if they are regular files, with a size cap
(the JSON: `MAX_JSON_BYTES`; the safetensors file: what the config's model needs plus the header
cap); the JSON is checked field by field (types, ranges, unknown fields refused, a nesting cap);
the model's size is bounded by arithmetic (`MAX_PARAMETERS`) before anything is built; the
safetensors header is parsed here and its tensor names, dtypes, shapes and byte ranges must be
exactly those of the model the config describes (built on torch's meta device: no memory); only
then are the tensors read, and NaN/Inf weights, negative variances and bad entropy tables refused.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from ..errors import ConfigError, WeightsError
from .model import CompressiveAutoencoder
from .presets import STRIDE, ModelConfig, get_preset
from .quantizer import MODES, QuantizerConfig

FORMAT = "neural-video-codec"
FORMAT_VERSION = 1
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_NAME = "default"
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}
ENTROPY_KEY = "entropy.counts"
# inter-frame (P-frame) residual tables, (levels, C, contexts, 511) counts: see residual.py
RESIDUAL_KEY = "entropy.residual_counts"

# Limits on untrusted weights (the shipped ones: 6 KB of JSON, 240k parameters, 7 levels).
MAX_JSON_BYTES = 1 << 20  # the config; its free-form `training` provenance is a few KB
MAX_JSON_DEPTH = 16  # nesting of the config (the shipped ones: 4)
MAX_HEADER_BYTES = 1 << 20  # the safetensors JSON header (the shipped ones: < 6 KB)
MAX_PARAMETERS = 32 << 20  # 128 MiB of float32; the largest preset has 3.0M
MAX_FRAME_SIZE = 1024
MAX_LEVELS = 16  # step-mode quantizer levels (the shipped default: 7)
MAX_RANGE = 65504.0  # |lo|, |hi| of a fixed range: float16's largest (ranges are float16-exact)
MAX_STEP = 1e6
MIN_STEP = 1e-6  # keeps range / step (the integers of step mode's grid) far inside int64
MAX_PRESET_CHARS = 64
# Tables left unread (`entropy_tables=False`) may be of an older shape: bound their bytes only.
MAX_UNCHECKED_TABLE_BYTES = 64 << 20
TOP_FIELDS = ("format", "format_version", "preset", "model", "quantizer", "frame_size", "training", "model_id")
QUANTIZER_FIELDS = ("bits", "mode", "lo", "hi", "steps", "level")
CONVERT_HINT = ("load it with torch only where you trust it and write safetensors + JSON with "
                "streamer.codec.weights.save(path, cfg, model) (safetensors.torch.save_file for the tensors)")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _integer(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise WeightsError(f"{what} must be an integer, got {_short(v)}")
    if not lo <= v <= hi:
        raise WeightsError(f"{what} must be in {lo}..{hi}, got {_short(v)}")
    return v


def _numbers(v: Any, what: str, most: int, bound: float) -> list[float]:
    """A JSON list of at most `most` finite numbers with |x| <= bound."""
    if not isinstance(v, list):
        raise WeightsError(f"{what} must be a list of numbers, got {_short(v)}")
    if len(v) > most:
        raise WeightsError(f"{what} has {len(v)} values; at most {most}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or abs(x) > bound:
            raise WeightsError(f"{what} holds {_short(x)}; expected finite numbers within +-{bound:g}")
    return [float(x) for x in v]


def check_quantizer_dict(d: Any, channels: int) -> QuantizerConfig:
    """The JSON `quantizer` object, field by field, for a model of `channels` latent channels."""
    if not isinstance(d, dict):
        raise WeightsError(f"quantizer config must be an object, got {_short(d)}")
    unknown = set(d) - set(QUANTIZER_FIELDS)
    if unknown:
        raise WeightsError(f"unknown quantizer field(s) {sorted(unknown)[:8]}; valid: {', '.join(QUANTIZER_FIELDS)}")
    bits = _integer(d.get("bits", 6), "quantizer.bits", 1, 8)
    mode = d.get("mode", "fixed")
    if mode not in MODES:
        raise WeightsError(f"quantizer.mode {_short(mode)} unknown; valid: {', '.join(MODES)}")
    lo = _numbers(d.get("lo", []), "quantizer.lo", channels, MAX_RANGE)
    hi = _numbers(d.get("hi", []), "quantizer.hi", channels, MAX_RANGE)
    if len(lo) != len(hi) or len(lo) not in (0, channels):
        raise WeightsError(f"quantizer.lo/hi have {len(lo)}/{len(hi)} values; the model has {channels} channels")
    if any(not h > l for l, h in zip(lo, hi)):
        raise WeightsError("quantizer range needs hi > lo in every channel")
    steps = _numbers(d.get("steps", []), "quantizer.steps", MAX_LEVELS, MAX_STEP)
    if any(not v >= MIN_STEP for v in steps):
        raise WeightsError(f"quantizer.steps must be positive, at least {MIN_STEP:g}; got {_short(steps)}")
    if mode == "step" and not steps:
        raise WeightsError("a step-mode quantizer needs quantizer.steps")
    levels = len(steps) if mode == "step" else 1
    level = _integer(d.get("level", 0), "quantizer.level", 0, levels - 1)
    try:
        q = QuantizerConfig(bits=bits, mode=mode, lo=lo, hi=hi, steps=steps, level=level)
        q.validate(channels)
    except ConfigError as e:
        raise WeightsError(f"bad quantizer config: {e}") from None
    return q


@dataclass
class CodecConfig:
    """Everything but the tensors: what the JSON file holds."""

    preset: str = "lite"
    model: ModelConfig = field(default_factory=lambda: get_preset("lite"))
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    frame_size: int = 224
    training: dict[str, Any] = field(default_factory=dict)
    # entropy tables (levels, C, contexts, 256) from the safetensors file; None: raw codes only
    entropy_counts: np.ndarray | None = field(default=None, repr=False)
    # P-frame residual tables (levels, C, contexts, 511); None: every frame is intra-coded
    residual_counts: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "preset": self.preset,
                "model": self.model.to_dict(), "quantizer": self.quantizer.to_dict(),
                "frame_size": self.frame_size, "training": self.training}

    @classmethod
    def from_dict(cls, d: Any) -> "CodecConfig":
        """A parsed JSON config, checked field by field; WeightsError on anything else."""
        if not isinstance(d, dict):
            raise WeightsError(f"not a {FORMAT} config: the JSON is a {type(d).__name__}, not an object")
        if d.get("format") != FORMAT:
            raise WeightsError(f"not a {FORMAT} config (format={_short(d.get('format'))})")
        version = d.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise WeightsError(f"weights format version {_short(version)}; this build reads {FORMAT_VERSION}")
        unknown = set(d) - set(TOP_FIELDS)
        if unknown:
            raise WeightsError(f"unknown config field(s) {sorted(unknown)[:8]}; valid: {', '.join(TOP_FIELDS)}")
        for key in ("model", "quantizer"):
            if key not in d:
                raise WeightsError(f"weights config lacks '{key}'")
        try:
            model = ModelConfig.from_dict(d["model"])
        except ConfigError as e:
            raise WeightsError(f"bad weights config: {e}") from None
        if model.parameter_count() > MAX_PARAMETERS:
            raise WeightsError(f"the config's model has {model.parameter_count():,} parameters; "
                               f"this build loads at most {MAX_PARAMETERS:,}")
        quant = check_quantizer_dict(d["quantizer"], model.latent_channels)
        size = _integer(d.get("frame_size", 224), "frame_size", STRIDE, MAX_FRAME_SIZE)
        if size % STRIDE:
            raise WeightsError(f"frame_size {size} is not a multiple of the model's stride {STRIDE}")
        preset = d.get("preset", "custom")
        if not isinstance(preset, str) or not 0 < len(preset) <= MAX_PRESET_CHARS:
            raise WeightsError(f"preset must be a name of 1..{MAX_PRESET_CHARS} characters, got {_short(preset)}")
        training = d.get("training", {})
        if not isinstance(training, dict):
            raise WeightsError(f"training (provenance) must be an object, got {_short(training)}")
        mid = d.get("model_id")
        if mid is not None and not (isinstance(mid, str) and re.fullmatch(r"[0-9a-f]{8}", mid)):
            raise WeightsError(f"model_id must be 8 hex digits, got {_short(mid)}")
        return cls(preset=preset, model=model, quantizer=quant, frame_size=size, training=dict(training))


def model_id(cfg: CodecConfig, state: dict[str, torch.Tensor]) -> int:
    """A 32-bit fingerprint of architecture, quantizer and every weight. It travels in each
    packet so a receiver never decodes latents made by a different model."""
    crc = zlib.crc32(json.dumps({"model": cfg.model.to_dict(), "quantizer": cfg.quantizer.to_dict()},
                                sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"", crc)
    return crc


def resolve(name_or_path: str | Path) -> tuple[Path, Path]:
    """(json, safetensors) for a packaged name ('default', 'lite-24x6') or a path to either file."""
    p = Path(name_or_path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{p} looks like a pickled checkpoint; only safetensors + JSON are loaded "
                           f"(unpickling can run arbitrary code). To convert it, {CONVERT_HINT}.")
    if p.suffix in (".json", ".safetensors"):
        base = p.with_suffix("")
    elif p.parent == Path(".") and not p.exists():
        base = PACKAGE_WEIGHTS / str(name_or_path)
    else:
        base = p
    js, st = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not js.exists() or not st.exists():
        known = sorted(f.stem for f in PACKAGE_WEIGHTS.glob("*.json")) if PACKAGE_WEIGHTS.exists() else []
        raise WeightsError(f"no weights at {base} (need {js.name} and {st.name}); "
                           f"packaged models: {', '.join(known) or 'none'}")
    return js, st


def read_capped(path: Path, cap: int) -> bytes:
    """The bytes of a regular file of at most `cap` bytes; WeightsError for anything else (a
    device such as /dev/zero, a FIFO, a directory, a file too big). Symlinks to regular files are
    fine: the check is on what is opened, and at most cap + 1 bytes are ever read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise WeightsError(f"{path}: cannot open ({e.strerror})") from None
    try:  # O_NONBLOCK: opening a FIFO does not wait for a writer
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise WeightsError(f"{path} is not a regular file; refusing to read it")
        if info.st_size > cap:
            raise WeightsError(f"{path} has {info.st_size:,} bytes; at most {cap:,} expected")
        chunks, left = [], cap + 1
        while left > 0:
            chunk = os.read(fd, min(left, max(info.st_size + 1, 1 << 16)))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > cap:  # a file that grew, or one (/proc) whose size says 0
        raise WeightsError(f"{path} holds more than {cap:,} bytes; refusing it")
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:  # parsers disagree on which copy wins: refuse instead of guessing
            raise WeightsError(f"duplicate JSON key {_short(k)}")
        d[k] = v
    return d


def parse_json(data: bytes, where: str, depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, nesting at most `depth` deep."""
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise WeightsError(f"{where}: JSON nested too deeply (at most {depth} levels)") from None
    except UnicodeDecodeError as e:
        raise WeightsError(f"{where}: not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, and Python's cap on digits of an integer
        raise WeightsError(f"{where}: not valid JSON ({str(e)[:120]})") from None
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        v, level = stack.pop()
        if level > depth:
            raise WeightsError(f"{where}: JSON nested too deeply (at most {depth} levels)")
        stack.extend((x, level + 1) for x in (v.values() if isinstance(v, dict) else v)
                     if isinstance(x, (dict, list)))
    return obj


def load_config(js: Path) -> CodecConfig:
    return CodecConfig.from_dict(parse_json(read_capped(js, MAX_JSON_BYTES), str(js)))


# -- the safetensors file --------------------------------------------------------------------------

DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}
ITEMSIZE = {"F32": 4, "I64": 8, "I32": 4}
TABLE_DTYPES = ("I32", "I64")  # `save` writes int32 counts


@functools.lru_cache(maxsize=16)
def expected_tensors(model: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of the state dict of `CompressiveAutoencoder(model)`,
    from a copy built on the meta device: no memory, and always exactly what load_state_dict
    wants. Call only for configs that passed `ModelConfig.validate` and the parameter cap."""
    with torch.device("meta"):
        net = CompressiveAutoencoder(model)
    return {k: (DTYPES[v.dtype], tuple(v.shape)) for k, v in net.state_dict().items()}


def _table_shape(cfg: CodecConfig) -> tuple[int, int, int, int]:
    from .entropy import CONTEXTS, MAX_SYMBOLS

    levels = len(cfg.quantizer.steps) if cfg.quantizer.mode == "step" else 1
    return (levels, cfg.model.latent_channels, CONTEXTS, MAX_SYMBOLS)


def _residual_shape(cfg: CodecConfig) -> tuple[int, int, int, int]:
    from .residual import CONTEXTS, RESIDUAL_SYMBOLS

    levels = len(cfg.quantizer.steps) if cfg.quantizer.mode == "step" else 1
    return (levels, cfg.model.latent_channels, CONTEXTS, RESIDUAL_SYMBOLS)


def _sniff(data: bytes, st: Path) -> int:
    """The header length of a safetensors file, decided by its structure first: 8 bytes of
    little-endian length N, then N bytes of JSON starting with '{'. Only what fails that is named
    a pickle (0x80 and a protocol 2..5) or a zip (torch.save), so a header length of 0x80 mod
    256 is no pickle."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if 2 <= n <= len(data) - 8 and data[8:9] == b"{":
        if n > MAX_HEADER_BYTES:
            raise WeightsError(f"{st}: safetensors header of {n:,} bytes; at most {MAX_HEADER_BYTES:,}")
        return n
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or data[:4] == b"PK\x03\x04":
        raise WeightsError(f"{st} is a pickle/zip checkpoint (torch.save), not safetensors; refusing to "
                           f"load it (unpickling can run arbitrary code). To convert it, {CONVERT_HINT}.")
    if len(data) < 8:
        raise WeightsError(f"{st}: not a safetensors file (truncated: {len(data)} bytes)")
    if n > len(data) - 8:
        raise WeightsError(f"{st}: not a safetensors file (header length {n:,} but {len(data) - 8:,} bytes "
                           "follow: truncated or not safetensors)")
    raise WeightsError(f"{st}: not a safetensors file (no JSON header after the length)")


def check_header(header: Any, data_bytes: int, st: Path,
                 expected: dict[str, tuple[str, tuple[int, ...]]] | None = None,
                 table: tuple[int, ...] | None = None,
                 residual_table: tuple[int, ...] | None = None) -> None:
    """A parsed safetensors header: entries of known dtypes whose byte ranges exactly tile the
    `data_bytes` that follow it. With `expected` (name -> (dtype, shape)) the names, dtypes and
    shapes must be exactly those, plus an optional `ENTROPY_KEY` of shape `table` (None: any
    integer table of bounded size)."""
    if not isinstance(header, dict):
        raise WeightsError(f"{st}: safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WeightsError(f"{st}: safetensors __metadata__ must map strings to strings")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if expected is not None:
        missing = sorted(set(expected) - set(entries))
        extra = sorted(set(entries) - set(expected) - {ENTROPY_KEY, RESIDUAL_KEY})
        if missing or extra:
            problems = ([f"lacks tensors {missing[:6]}"] if missing else []) + (
                [f"unexpected tensors {[_short(k) for k in extra[:6]]}"] if extra else [])
            raise WeightsError(f"{st} does not match its config: {'; '.join(problems)}")
    spans = []
    for name, e in entries.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{st}: tensor {_short(name)} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 8 or any(
                isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= 1 << 40 for x in shape):
            raise WeightsError(f"{st}: tensor {_short(name)} has a bad shape {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(not isinstance(x, bool) and isinstance(x, int) for x in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise WeightsError(f"{st}: tensor {_short(name)} has bad data_offsets {_short(offsets)} "
                               f"({data_bytes:,} data bytes)")
        if name in (ENTROPY_KEY, RESIDUAL_KEY):
            want = table if name == ENTROPY_KEY else residual_table
            if dtype not in TABLE_DTYPES:
                raise WeightsError(f"{st}: entropy tables of dtype {_short(dtype)}; "
                                   f"expected {' or '.join(TABLE_DTYPES)}")
            if want is not None and tuple(shape) != want:
                raise WeightsError(f"{st}: entropy tables {name} of shape {tuple(shape)}; expected {want} counts")
            if len(shape) != 4 or math.prod(shape) * ITEMSIZE[dtype] > MAX_UNCHECKED_TABLE_BYTES:
                raise WeightsError(f"{st}: entropy tables of shape {tuple(shape)} ({dtype})")
        elif expected is not None:
            want_dtype, want_shape = expected[name]
            if dtype != want_dtype:
                raise WeightsError(f"{st}: tensor {name} is {_short(dtype)}; the model needs {want_dtype}")
            if tuple(shape) != want_shape:
                raise WeightsError(f"{st} does not match its config: tensor {name} has shape "
                                   f"{tuple(shape)}, the model needs {want_shape}")
        elif dtype not in ITEMSIZE:
            raise WeightsError(f"{st}: tensor {_short(name)} of unsupported dtype {_short(dtype)}")
        if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
            raise WeightsError(f"{st}: tensor {_short(name)} spans {offsets[1] - offsets[0]:,} bytes; "
                               f"{dtype} {tuple(shape)} needs {math.prod(shape) * ITEMSIZE[dtype]:,}")
        spans.append((offsets[0], offsets[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise WeightsError(f"{st}: tensor data {'overlaps' if begin < pos else 'has a gap'} at "
                               f"{_short(name)} (byte {begin:,}, expected {pos:,})")
        pos = end
    if pos != data_bytes:
        raise WeightsError(f"{st}: {data_bytes - pos:,} bytes after the last tensor (truncated header or padding)")


def load_file_safely(st: Path, cfg: CodecConfig | None = None,
                     entropy_tables: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; WeightsError for a pickle, an unreadable or malformed
    file, or (given `cfg`) tensors that are not exactly the config's model (names, dtypes,
    shapes) or hold NaN/Inf. The header is checked before any tensor is read."""
    cap = 8 + MAX_HEADER_BYTES  # read no more than the config's model (and tables) need
    if cfg is not None:
        cap += sum(math.prod(shape) * ITEMSIZE[dt] for dt, shape in expected_tensors(cfg.model).values())
        cap += (math.prod(_table_shape(cfg)) + math.prod(_residual_shape(cfg))) * 8 if entropy_tables \
            else 2 * MAX_UNCHECKED_TABLE_BYTES
    else:
        cap += MAX_PARAMETERS * 8 + MAX_UNCHECKED_TABLE_BYTES
    return tensors_from_bytes(read_capped(st, cap), st, cfg, entropy_tables)


def tensors_from_bytes(data: bytes, st: Path | str, cfg: CodecConfig | None = None,
                       entropy_tables: bool = True) -> dict[str, torch.Tensor]:
    """`load_file_safely` on the bytes of a file (`st` names it in messages)."""
    expected = expected_tensors(cfg.model) if cfg is not None else None
    table = _table_shape(cfg) if cfg is not None and entropy_tables else None
    residual_table = _residual_shape(cfg) if cfg is not None and entropy_tables else None
    n = _sniff(data, st)
    header = parse_json(data[8:8 + n], f"{st} (safetensors header)", depth=3)
    if (cfg is not None and entropy_tables and isinstance(header, dict) and ENTROPY_KEY in header
            and cfg.quantizer.mode not in ("step", "fixed")):
        raise WeightsError(f"{st}: entropy tables with a {cfg.quantizer.mode} quantizer: codes have no fixed meaning")
    if (cfg is not None and entropy_tables and isinstance(header, dict) and RESIDUAL_KEY in header
            and (cfg.quantizer.mode != "step" or ENTROPY_KEY not in header)):
        raise WeightsError(f"{st}: residual tables need a step quantizer and intra tables")
    check_header(header, len(data) - 8 - n, st, expected, table, residual_table)
    try:
        state = load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{st}: not a readable safetensors file ({e})") from None
    floats = [t.reshape(-1) for t in state.values() if t.is_floating_point()]
    if floats and not bool(torch.isfinite(torch.cat(floats)).all()):  # one pass; then name the culprit
        bad = next(k for k, t in sorted(state.items()) if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        raise WeightsError(f"{st}: tensor {bad} holds NaN or Inf values")
    for name, t in state.items():
        if name.endswith(".running_var") and bool((t < 0).any()):
            raise WeightsError(f"{st}: tensor {name} holds negative variances")
    return state


def load(name_or_path: str | Path = DEFAULT_NAME,
         entropy_tables: bool = True) -> tuple[CodecConfig, CompressiveAutoencoder, int]:
    """(config, model in eval mode, model id) from safetensors + JSON. entropy_tables=False
    leaves any stored tables unread (and unchecked but for their size): for refitting them
    (`training.tables`)."""
    js, st = resolve(name_or_path)
    cfg = load_config(js)
    state = load_file_safely(st, cfg, entropy_tables)
    mid = model_id(cfg, state)
    counts = state.pop(ENTROPY_KEY, None)
    if counts is not None and entropy_tables:
        cfg.entropy_counts = check_counts(counts.numpy(), cfg)
    residual = state.pop(RESIDUAL_KEY, None)
    if residual is not None and entropy_tables:
        cfg.residual_counts = check_residual_counts(residual.numpy(), cfg)
    model = CompressiveAutoencoder(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the header check makes this unreachable; kept as a backstop
        raise WeightsError(f"{st} does not match the config in {js.name}: {str(e).splitlines()[0]}") from None
    model.eval()
    return cfg, model, mid


def check_counts(counts: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    """Entropy tables must have one (C, contexts, 256) block per quantizer level."""
    from .entropy import CONTEXTS, MAX_SYMBOLS

    levels = len(cfg.quantizer.steps) if cfg.quantizer.mode == "step" else 1
    want = (levels, cfg.model.latent_channels, CONTEXTS, MAX_SYMBOLS)
    if cfg.quantizer.mode not in ("step", "fixed"):
        raise WeightsError(f"entropy tables with a {cfg.quantizer.mode} quantizer: codes have no fixed meaning")
    if counts.shape != want or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise WeightsError(f"entropy tables of shape {counts.shape} ({counts.dtype}); expected {want} counts")
    return counts.astype(np.int64)


def check_residual_counts(counts: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    """P-frame residual tables: one (C, contexts, 511) block per level of a step quantizer."""
    want = _residual_shape(cfg)
    if cfg.quantizer.mode != "step":
        raise WeightsError(f"residual tables with a {cfg.quantizer.mode} quantizer: only step mode codes P-frames")
    if counts.shape != want or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise WeightsError(f"residual tables of shape {counts.shape} ({counts.dtype}); expected {want} counts")
    return counts.astype(np.int64)


def save(path: str | Path, cfg: CodecConfig, model: CompressiveAutoencoder) -> tuple[Path, Path]:
    """Write `<path>.safetensors` and `<path>.json`; returns both paths."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.entropy_counts is not None:
        counts = check_counts(np.asarray(cfg.entropy_counts), cfg)
        if counts.max() >= 2 ** 31:
            raise WeightsError("entropy counts overflow int32; fit them on fewer frames")
        state[ENTROPY_KEY] = torch.from_numpy(counts.astype(np.int32))  # half the bytes of int64
    if cfg.residual_counts is not None:
        counts = check_residual_counts(np.asarray(cfg.residual_counts), cfg)
        if counts.max() >= 2 ** 31:
            raise WeightsError("residual counts overflow int32; fit them on fewer frames")
        state[RESIDUAL_KEY] = torch.from_numpy(counts.astype(np.int32))
    st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
    d = cfg.to_dict()
    d["model_id"] = f"{model_id(cfg, state):08x}"
    text = json.dumps(d, indent=2) + "\n"
    # never write what `load` would refuse
    CodecConfig.from_dict(parse_json(text.encode(), "the config to save"))
    if len(text.encode()) > MAX_JSON_BYTES:
        raise WeightsError(f"the config would take {len(text.encode()):,} bytes of JSON; at most "
                           f"{MAX_JSON_BYTES:,} load (trim cfg.training)")
    save_file(state, str(st), metadata={"format": FORMAT, "preset": cfg.preset})
    js.write_text(text)
    return st, js
