"""Training configs: read, override, check, before any slow work.

A config is a TOML file whose sections go straight to constructors:

    top level    name, seed, threads, frame_size, stages, out_dir, log_dir, export, machine, init_from
    [model]      preset + any field of streamer.codec.ModelConfig     -> get_preset(preset, **rest)
    [quantizer]  bits, mode, steps, level, coverage, val_levels, keep_init -> QuantizerConfig
    [data]       the fields of DataConfig                              -> DataConfig(**)
    [stage1], [stage2]  the fields of StageConfig                      -> StageConfig(**)

`load_config(path, overrides)` reads the file, applies `--set SECTION.KEY=VALUE` overrides, fills
the defaults and checks everything it can without decoding a frame: every key against the fields
it feeds (the types come from the dataclass annotations), the model preset, the quantizer, the
data folders and `init_from`. Each mistake is one `ConfigError` whose message says where (file
and line, or which `--set`) and what would be valid; `python -m training.train` prints it as one
line and exits with status 2.
"""

from __future__ import annotations

import difflib
import importlib
import re
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union, get_args, get_origin, get_type_hints

from streamer.codec import PRESETS, ModelConfig, QuantizerConfig, get_preset
from streamer.errors import ConfigError, StreamerError

from . import data as D

EXTRA_HINT = "pip install 'neural-video-call[train]' (from a checkout: pip install -e '.[train]')"


class MissingExtraError(StreamerError):
    """An optional dependency of the `[train]` extra (tqdm, tensorboard, matplotlib) is missing."""


@dataclass
class DataConfig:
    train: str = "/work/shared/data/train"  # a folder of videos/images, or a VoxCeleb2 root
    val: str = "/work/shared/data/val"
    layout: str = "folder"  # "folder" or "voxceleb"
    partition: str = "dev"  # voxceleb: the partition to draw train (and val, by identity) from
    val_fraction: float = 0.1  # voxceleb: share of identities held out for val
    utterances: int | None = None  # voxceleb: number of utterances drawn at random
    every_s: float = 0.25  # one training frame every this many seconds (the seed: 10)
    cache_size: int = 224  # cached squares: the call's framing at this size
    cache_dir: str = "cache/frames"
    val_frames_per_clip: int = 6
    synthetic: int = 0  # > 0: this many generated frames instead of files (tests)


@dataclass
class StageConfig:
    crop: int = 128  # random crop side (the model is fully convolutional)
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-5  # cosine decay floor
    warmup_steps: int = 100
    max_steps: int = 100_000
    max_minutes: float = 0.0  # > 0: a wall-clock budget; the LR schedule follows whichever ends first
    weight_decay: float = 0.0
    eval_minutes: float = 5.0  # validate (and maybe export) this often; also at the end
    eval_every: int = 0  # > 0: validate every this many steps instead
    checkpoint_minutes: float = 3.0
    log_every: int = 20
    grad_clip: float = 1.0
    # rate-distortion training (stage 1): loss = MSE + rate_weight * estimated bits per pixel, with
    # uniform noise of width rate_step on the latents (see LaplaceRate). The model then trades
    # PSNR for bits, so each validation exports the latest model instead of the best PSNR.
    rate_weight: float = 0.0
    rate_step: float = 0.1
    # stage 2: also keep the decoder's batch-norm statistics (fine-tune weights only). Measured on
    # cpu-lite: with them updating, full-frame batches of 8 shifted the stage-1 statistics and the
    # first 450 steps lost 1.4 dB that 20 minutes did not win back.
    freeze_bn: bool = False
    # minimise log10(MSE) (i.e. -PSNR/10) instead of MSE: with a random quantizer level per batch,
    # plain MSE lets the coarsest levels' ten-times-larger errors steer the decoder (measured on
    # cpu-lite-coarse: pooled val PSNR over levels 3/5/7/9 fell 1.2 dB in 556 steps of MSE loss)
    log_mse: bool = False


# -- the schema: every key a config may hold and its type -----------------------------------------

TOP_LEVEL: dict[str, Any] = {
    "name": str, "seed": int, "threads": int, "frame_size": int, "stages": list[int],
    "out_dir": str, "log_dir": str, "export": str, "machine": str, "init_from": str,
    "dump_rank_weights": bool,  # tests: every rank writes the weights it ended with
}
SECTIONS: dict[str, dict[str, Any]] = {
    "model": {"preset": str, **get_type_hints(ModelConfig)},
    "quantizer": {"bits": int, "mode": str, "steps": list[float], "level": int, "coverage": float,
                  "val_levels": list[int], "keep_init": bool},
    "data": get_type_hints(DataConfig),
    "stage1": get_type_hints(StageConfig),
    "stage2": get_type_hints(StageConfig),
}


def closest(word: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest valid word, or ''."""
    match = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def key_type(section: str, key: str, where: str) -> Any:
    """The type of `section.key` (section "" is the top level); ConfigError if there is none."""
    if not section:
        if key in SECTIONS:
            raise ConfigError(f"{where}: [{key}] is a section, not a value: use {key}.KEY = VALUE")
        if key not in TOP_LEVEL:
            raise ConfigError(f"{where}: unknown top-level key {key!r}{closest(key, TOP_LEVEL)}; "
                              f"valid keys: {', '.join(sorted(TOP_LEVEL))}; sections: {', '.join(SECTIONS)}")
        return TOP_LEVEL[key]
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}]{closest(section, SECTIONS)}; "
                          f"valid sections: {', '.join(SECTIONS)}")
    if key not in SECTIONS[section]:
        raise ConfigError(f"{where}: unknown key {key!r} in [{section}]{closest(key, SECTIONS[section])}; "
                          f"valid keys: {', '.join(sorted(SECTIONS[section]))}")
    return SECTIONS[section][key]


def describe(typ: Any) -> str:
    if get_origin(typ) is list:
        return f"a list of {describe(get_args(typ)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[typ]


def kind(value: Any) -> str:
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                    (list, "a list"), (dict, "a table")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def coerce(value: Any, typ: Any, what: str) -> Any:
    """`value` as `typ` (int, float, str, bool, X | None, list[X]); ConfigError if it is not one."""
    if get_origin(typ) in (Union, types.UnionType):  # X | None: TOML has no null, so X
        typ = next(a for a in get_args(typ) if a is not type(None))
    if get_origin(typ) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{what} must be {describe(typ)}, got {value!r} ({kind(value)})")
        return [coerce(v, get_args(typ)[0], f"{what}[{i}]") for i, v in enumerate(value)]
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), bool: isinstance(value, bool)}[typ]
    if not ok:
        raise ConfigError(f"{what} must be {describe(typ)}, got {value!r} ({kind(value)})")
    return float(value) if typ is float else value


class Origins:
    """Where each value came from, for messages: `file:line` of its `key =` line, or `--set ...`."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.lines = str(path), {}
        section = ""
        for n, line in enumerate(text.splitlines(), 1):  # a plain scan: good enough to point at a line
            if m := re.match(r"\s*\[([^\[\]]+)\]\s*(#.*)?$", line):
                section = m.group(1).strip()
                self.lines.setdefault((section, ""), f"{self.path}:{n}")
            elif m := re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line):
                self.lines.setdefault((section, m.group(1)), f"{self.path}:{n}")

    def __call__(self, section: str, key: str = "", message: str = "") -> str:
        """Where `section.key` came from; with a message but no key, the key of `section` it names."""
        if not key and message:
            key = next((k for (s, k) in self.lines if s == section and k and re.search(rf"\b{k}\b", message)), "")
        return self.lines.get((section, key)) or self.lines.get((section, "")) or self.path

    def set_by(self, section: str, key: str, item: str) -> None:
        self.lines[(section, key)] = f"--set {item}"


def check_tree(raw: dict[str, Any], at: Origins) -> dict[str, Any]:
    """Every key of a parsed file known and of its type (ints become floats where floats go)."""
    cfg: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in SECTIONS and key not in TOP_LEVEL:
            key_type(key, "", at(key))  # an unknown [section]
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{at('', key)}: [{key}] must be a section (a table), got {value!r}")
            cfg[key] = {k: coerce(v, key_type(key, k, at(key, k)), f"{at(key, k)}: [{key}] {k}")
                        for k, v in value.items()}
        else:
            cfg[key] = coerce(value, key_type("", key, at("", key)), f"{at('', key)}: {key}")
    return cfg


def apply_override(raw: dict[str, Any], item: str, at: Origins) -> None:
    """One `--set SECTION.KEY=VALUE` (or `KEY=VALUE` at the top level) into the parsed file, before
    `check_tree` checks the types. VALUE is TOML, and a bare word is taken as a string where a
    string goes (`--set data.train=/data/train`)."""
    key, eq, text = item.partition("=")
    where = f"--set {item}"
    section, _, name = key.strip().rpartition(".")
    if not eq or not name:
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set stage1.max_minutes=1")
    typ = key_type(section, name, where)
    try:
        doc = tomllib.loads(f"v = {text}")
        if set(doc) != {"v"}:
            raise tomllib.TOMLDecodeError("more than one value")
        value = doc["v"]
    except tomllib.TOMLDecodeError as e:
        if typ is not str:
            raise ConfigError(f"{where}: cannot read {text!r} as {describe(typ)} ({toml_reason(e)[0]}); "
                              f"VALUE is TOML, e.g. 16, 2e-3, true, [1, 2], \"text\"") from None
        value = text  # a bare string
    target = raw.setdefault(section, {}) if section else raw
    if not isinstance(target, dict):
        raise ConfigError(f"{at('', section)}: [{section}] must be a section (a table), got {target!r}")
    target[name] = value
    at.set_by(section, name, item)


def toml_reason(e: tomllib.TOMLDecodeError) -> tuple[str, str]:
    """(message, 'line:column') of a TOML error (Python 3.11's carries them only in its text)."""
    m = re.match(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)$", str(e))
    if not m:
        return str(e), ""
    return m.group(1), (f"{m.group(2)}:{m.group(3)}" if m.group(2) else "end")


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """(parsed, text) of a config file; ConfigError if it is missing or not TOML."""
    if not path.exists():
        raise ConfigError(f"no config file at {path} (the shipped ones: training/configs/*.toml)")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a file (the shipped ones: training/configs/*.toml)")
    try:
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text), text
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        reason, at = toml_reason(e)
        raise ConfigError(f"{path}:{at}: invalid TOML: {reason}" if at else f"{path}: invalid TOML: {reason}") from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The config at `path` with `overrides` (`--set` items) applied and defaults filled in, checked
    as far as it can be without decoding frames (see `check`). ConfigError says what is wrong."""
    path = Path(path)
    raw, text = read_toml(path)
    at = Origins(path, text)
    for item in overrides:
        apply_override(raw, item, at)
    cfg = check_tree(raw, at)
    cfg.setdefault("name", path.stem)
    cfg.setdefault("seed", 0)
    cfg.setdefault("threads", 0)
    cfg.setdefault("frame_size", 224)
    cfg.setdefault("stages", [1, 2])
    cfg.setdefault("out_dir", f"checkpoints/{cfg['name']}")
    cfg.setdefault("log_dir", f"runs/{cfg['name']}")
    cfg.setdefault("model", {"preset": "lite"})
    cfg.setdefault("quantizer", {"bits": 6})
    for key in ("data", "stage1", "stage2"):
        cfg.setdefault(key, {})
    check(cfg, at)
    return cfg


# -- what the values must be, together ------------------------------------------------------------

def check(cfg: dict[str, Any], at: Origins) -> None:
    """Values that are each of the right type but wrong, alone or together."""
    stages = cfg["stages"]
    if not stages or any(s not in (1, 2) for s in stages) or stages != sorted(set(stages)):
        raise ConfigError(f"{at('', 'stages')}: stages must be [1], [2] or [1, 2], got {stages}")
    fs = cfg["frame_size"]
    if fs < 8 or fs % 8:
        raise ConfigError(f"{at('', 'frame_size')}: frame_size must be a positive multiple of 8, got {fs}")

    model = dict(cfg["model"])
    preset = model.pop("preset", "lite")
    if preset not in PRESETS:
        raise ConfigError(f"{at('model', 'preset')}: unknown model preset {preset!r}{closest(preset, PRESETS)}; "
                          f"valid presets: {', '.join(PRESETS)}")
    try:
        mcfg = get_preset(preset, **model)
    except ConfigError as e:
        raise ConfigError(f"{at('model', message=str(e))}: [model] {e}") from None

    q = cfg["quantizer"]
    qcfg = QuantizerConfig(bits=q.get("bits", 6), mode=q.get("mode", "fixed"), steps=q.get("steps", []),
                           level=q.get("level", 0))
    try:
        qcfg.validate(mcfg.latent_channels)
    except ConfigError as e:
        raise ConfigError(f"{at('quantizer', message=str(e))}: [quantizer] {e}") from None
    if not 0 < q.get("coverage", 0.9999) <= 1:
        raise ConfigError(f"{at('quantizer', 'coverage')}: [quantizer] coverage must be in (0, 1], got {q['coverage']}")
    bad = [v for v in q.get("val_levels", []) if not 0 <= v < len(qcfg.steps)]
    if bad:
        raise ConfigError(f"{at('quantizer', 'val_levels')}: [quantizer] val_levels {bad} outside the "
                          f"{len(qcfg.steps)} levels of steps")

    if q.get("keep_init") and (stages != [2] or not cfg.get("init_from")):
        raise ConfigError(f"{at('quantizer', 'keep_init')}: [quantizer] keep_init fine-tunes the decoder of "
                          f"init_from's step-mode weights: it needs stages = [2] and init_from")
    dc = DataConfig(**cfg["data"])
    if dc.layout not in ("folder", "voxceleb"):
        raise ConfigError(f"{at('data', 'layout')}: [data] layout must be 'folder' or 'voxceleb', got {dc.layout!r}")
    if dc.cache_size < 8:
        raise ConfigError(f"{at('data', 'cache_size')}: [data] cache_size must be at least 8, got {dc.cache_size}")
    whole_frames = ((1 in stages and mcfg.linear_path and not cfg.get("init_from"))  # the PCA start
                    or (2 in stages and qcfg.mode == "step"))  # entropy tables
    if whole_frames and dc.cache_size < fs:
        raise ConfigError(f"{at('data', 'cache_size')}: [data] cache_size {dc.cache_size} is smaller than "
                          f"frame_size {fs}: the cached frames must hold whole {fs}-px frames")
    for stage in stages:
        section = f"stage{stage}"
        sc = StageConfig(**cfg[section])
        for name in ("batch_size", "max_steps", "log_every"):
            if getattr(sc, name) < 1:
                raise ConfigError(f"{at(section, name)}: [{section}] {name} must be at least 1, got {getattr(sc, name)}")
        if sc.crop < 8 or sc.crop % 8 or sc.crop > dc.cache_size:
            raise ConfigError(f"{at(section, 'crop')}: [{section}] crop must be a multiple of 8 no larger than "
                              f"[data] cache_size {dc.cache_size}, got {sc.crop}")
        if not sc.lr > 0:
            raise ConfigError(f"{at(section, 'lr')}: [{section}] lr must be positive, got {sc.lr}")
    if not dc.synthetic:
        check_data(dc, at)
    if cfg.get("init_from") and not any(Path(cfg["init_from"]).with_suffix(s).is_file()
                                        for s in (".json", ".safetensors")):
        raise ConfigError(f"{at('', 'init_from')}: init_from: no codec weights at {cfg['init_from']} "
                          f"(a stage-1 run's best-stage1.json, or set init_from = \"\")")


def check_data(dc: DataConfig, at: Origins) -> None:
    """The data folders exist and hold videos or images (listing only; nothing is decoded)."""
    train, val = f"{at('data', 'train')}: [data] train", f"{at('data', 'val')}: [data] val"
    if dc.layout == "folder":
        check_media(dc.train, train)
        check_media(dc.val, val)
    else:
        check_voxceleb(dc.train, dc.partition, train)
        if dc.val:
            check_voxceleb(dc.val, "test", val)


def check_media(root: str | Path, what: str) -> None:
    """`root` is a video/image file or a folder with at least one under it; ConfigError if not."""
    if not str(root):
        raise ConfigError(f"{what} is empty: name a folder of videos or images")
    p = Path(root)
    if p.is_file():
        if not (D.is_video(p) or D.is_image(p)):
            raise ConfigError(f"{what}: {p} is not a video or image file")
        return
    if not p.is_dir():
        raise ConfigError(f"{what}: no data folder at {p}")
    if not any(f.is_file() and (D.is_video(f) or D.is_image(f)) for f in p.rglob("*")):
        raise ConfigError(f"{what}: no video or image file under {p} "
                          f"(looked for {', '.join(sorted(D.VIDEO_SUFFIXES | D.IMAGE_SUFFIXES))})")


def check_voxceleb(root: str | Path, partition: str, what: str) -> None:
    base = Path(root) / partition
    if not base.is_dir():
        raise ConfigError(f"{what}: no VoxCeleb2 partition at {base} (expected {partition}/<id>/<video>/<utt>.mp4)")
    if not any(p.is_file() and D.is_video(p) for p in base.glob("*/*/*")):
        raise ConfigError(f"{what}: no utterance videos under {base} (expected {partition}/<id>/<video>/<utt>.mp4)")


EXTRA_MODULES = {"tensorboard": "torch.utils.tensorboard"}  # what to import to know a package works


def require_extra(*packages: str) -> None:
    """Import the optional `[train]` packages now (tqdm, tensorboard, matplotlib), so that a missing
    one is one clear error up front instead of a traceback after the slow work."""
    for package in packages:
        try:
            importlib.import_module(EXTRA_MODULES.get(package, package))
        except ImportError:
            raise MissingExtraError(f"{package} is not installed (it comes with the [train] extra): "
                                    f"{EXTRA_HINT}") from None
