"""Weights on disk: `<name>.safetensors` (tensors only, no code) beside `<name>.json` (config).

The JSON names the architecture and the quantizer, so a file alone rebuilds the whole codec:

    {"format": "neural-video-codec", "format_version": 1, "preset": "lite",
     "model": {...ModelConfig fields}, "quantizer": {"bits": 6, "mode": "fixed", "lo": [...], "hi": [...]},
     "frame_size": 224, "training": {...free-form provenance}}

Models with entropy coding also hold their probability tables in the safetensors file (key
`entropy.counts`, (levels, channels, contexts, 256) symbol counts, see `entropy.py`); they are part of
the model id like every weight.

Pickled checkpoints (.pt/.pth/.ckpt/.pkl) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, WeightsError
from .model import CompressiveAutoencoder
from .presets import ModelConfig, get_preset
from .quantizer import QuantizerConfig

FORMAT = "neural-video-codec"
FORMAT_VERSION = 1
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_NAME = "default"
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}


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

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "preset": self.preset,
                "model": self.model.to_dict(), "quantizer": self.quantizer.to_dict(),
                "frame_size": self.frame_size, "training": self.training}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CodecConfig":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise WeightsError(f"not a {FORMAT} config (format={d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise WeightsError(f"weights format version {d.get('format_version')}; this build reads {FORMAT_VERSION}")
        try:
            model = ModelConfig.from_dict(d["model"])
            quant = QuantizerConfig.from_dict(d["quantizer"])
            quant.validate(model.latent_channels)
            size = int(d.get("frame_size", 224))
        except KeyError as e:
            raise WeightsError(f"weights config lacks {e}") from None
        except ConfigError as e:
            raise WeightsError(f"bad weights config: {e}") from None
        return cls(preset=str(d.get("preset", "custom")), model=model, quantizer=quant,
                   frame_size=size, training=dict(d.get("training", {})))


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
                           "(unpickling can run arbitrary code). Export it with training.export.")
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


def load_config(js: Path) -> CodecConfig:
    try:
        return CodecConfig.from_dict(json.loads(js.read_text()))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{js}: not valid JSON ({e})") from None


def load_file_safely(st: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; WeightsError for a pickle or an unreadable file."""
    with open(st, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or head[:2] == b"PK":  # pickle protocol / torch.save zip
        raise WeightsError(f"{st} is a pickle/zip checkpoint, not safetensors; refusing to load it")
    try:
        return load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{st}: not a readable safetensors file ({e})") from None


def load(name_or_path: str | Path = DEFAULT_NAME,
         entropy_tables: bool = True) -> tuple[CodecConfig, CompressiveAutoencoder, int]:
    """(config, model in eval mode, model id) from safetensors + JSON. entropy_tables=False
    leaves any stored tables unread (and unchecked): for refitting them (`training.tables`)."""
    js, st = resolve(name_or_path)
    cfg = load_config(js)
    state = load_file_safely(st)
    mid = model_id(cfg, state)
    counts = state.pop(ENTROPY_KEY, None)
    if counts is not None and entropy_tables:
        cfg.entropy_counts = check_counts(counts.numpy(), cfg)
    model = CompressiveAutoencoder(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{st} does not match the config in {js.name}: {str(e).splitlines()[0]}") from None
    model.eval()
    return cfg, model, mid


ENTROPY_KEY = "entropy.counts"


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
    st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
    save_file(state, str(st), metadata={"format": FORMAT, "preset": cfg.preset})
    d = cfg.to_dict()
    d["model_id"] = f"{model_id(cfg, state):08x}"
    js.write_text(json.dumps(d, indent=2) + "\n")
    return st, js
