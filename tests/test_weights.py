"""Weights files are untrusted input: every crafted one is a `WeightsError`, raised before any
real model or big tensor is built; every valid export loads, whatever its header length.

The crafted cases start from a valid export of a tiny model and break one thing each. Each is
loaded under a guard that fails the test if a real (non-meta) `CompressiveAutoencoder` is
built, and under tracemalloc with a small bound on Python-side allocations (file bytes, JSON,
NumPy): a case that got as far as reading or building something big fails either way.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from streamer.codec import PRESETS, NeuralCodec, weights
from streamer.codec.model import CompressiveAutoencoder, count_parameters
from streamer.codec.presets import LIMITS, ModelConfig
from streamer.codec.quantizer import QuantizerConfig
from streamer.errors import WeightsError

TINY = dict(latent_channels=4, width1=4, width2=8, res_blocks=0)
STEPS = [0.1, 0.2]
# Python-side allocations while refusing one crafted file: most stay near 100 KB; a config near
# the 1 MiB JSON cap parses into ~10 MB of Python objects (10^5 floats); the attacker's files asked
# for 300 GB.
PEAK_BYTES = 16 << 20


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    """Pristine (json, safetensors) bytes of two tiny exports: 'fixed' (no tables) and 'step'
    (two levels, entropy tables)."""
    root = tmp_path_factory.mktemp("pristine")
    fixed = NeuralCodec.untrained("lite", bits=8, mode="fixed", frame_size=32, **TINY)
    st, js = weights.save(root / "fixed", fixed.cfg, fixed.model)
    out = {"fixed": (js.read_bytes(), st.read_bytes())}
    cfg = fixed.cfg
    cfg.quantizer = QuantizerConfig(bits=8, mode="step", steps=STEPS, level=1, lo=cfg.quantizer.lo, hi=cfg.quantizer.hi)
    step = NeuralCodec(cfg, fixed.model, 0)
    step.set_entropy_counts(np.ones((len(STEPS), TINY["latent_channels"], 9, 256), np.int64))
    st, js = weights.save(root / "step", step.cfg, step.model)
    out["step"] = (js.read_bytes(), st.read_bytes())
    return out


# -- helpers that break one thing ----------------------------------------------------------------

Mutator = Callable[[Path, Path], None]


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | bytes, body: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def cfg_edit(fn: Callable[[dict], object]) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        d = json.loads(js.read_text())
        fn(d)
        js.write_text(json.dumps(d))
    return mutate


def model_field(**kv) -> Mutator:
    return cfg_edit(lambda d: d["model"].update(kv))


def quant_field(**kv) -> Mutator:
    return cfg_edit(lambda d: d["quantizer"].update(kv))


def top_field(**kv) -> Mutator:
    return cfg_edit(lambda d: d.update(kv))


def drop(*path: str) -> Mutator:
    def fn(d: dict) -> None:
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]
    return cfg_edit(fn)


def json_text(text: str | bytes) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        js.write_bytes(text.encode() if isinstance(text, str) else text)
    return mutate


def json_replace(old: str, new: str) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        text = js.read_text()
        assert old in text
        js.write_text(text.replace(old, new, 1))
    return mutate


def header_edit(fn: Callable[[dict], object]) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        header, body = split(st.read_bytes())
        fn(header)
        st.write_bytes(join(header, body))
    return mutate


def st_bytes(fn: Callable[[bytes], bytes]) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        st.write_bytes(fn(st.read_bytes()))
    return mutate


def tensors_edit(fn: Callable[[dict[str, torch.Tensor]], object]) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        data = st.read_bytes()
        state = st_load(data)
        fn(state)
        st.write_bytes(st_save(state, metadata=split(data)[0].get("__metadata__")))
    return mutate


def symlink_to(target: str, which: str) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        p = js if which == "json" else st
        p.unlink()
        p.symlink_to(target)
    return mutate


def fifo(which: str) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        p = js if which == "json" else st
        p.unlink()
        os.mkfifo(p)
    return mutate


def directory(which: str) -> Mutator:
    def mutate(js: Path, st: Path) -> None:
        p = js if which == "json" else st
        p.unlink()
        p.mkdir()
    return mutate


def nested(depth: int) -> Mutator:
    def fn(d: dict) -> None:
        v: object = 1
        for _ in range(depth):
            v = [v]
        d["training"] = {"deep": v}
    return cfg_edit(fn)


def first(state: dict[str, torch.Tensor], suffix: str) -> str:
    return next(k for k in sorted(state) if k.endswith(suffix))


def set_value(suffix: str, value: float) -> Mutator:
    def fn(state: dict[str, torch.Tensor]) -> None:
        state[first(state, suffix)].view(-1)[0] = value
    return tensors_edit(fn)


def pickle_bytes(js: Path, st: Path) -> None:
    st.write_bytes(pickle.dumps({"encoder.net.0.weight": [0.0] * 16}, protocol=4))  # writing, never reading


def zip_bytes(js: Path, st: Path) -> None:
    st.write_bytes(b"PK\x03\x04" + bytes(60))


def huge_json(js: Path, st: Path) -> None:
    d = json.loads(js.read_text())
    d["training"] = {"notes": "x" * (weights.MAX_JSON_BYTES + 1)}
    js.write_text(json.dumps(d))


def huge_safetensors(js: Path, st: Path) -> None:
    with open(st, "ab") as f:
        f.truncate(st.stat().st_size + weights.MAX_HEADER_BYTES + (8 << 20))  # sparse: no disk used


def header_length(n: int) -> Mutator:
    return st_bytes(lambda b: struct.pack("<Q", n) + b[8:])


def offsets(fn: Callable[[list[int]], list[int]], suffix: str = "encoder.net.0.weight") -> Mutator:
    return header_edit(lambda h: h[suffix].update(data_offsets=fn(h[suffix]["data_offsets"])))


def swap_offsets(h: dict) -> None:
    a, b = "encoder.net.0.bias", "encoder.net.0.weight"
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


def duplicate_header_key(js: Path, st: Path) -> None:
    header, body = split(st.read_bytes())
    raw = json.dumps(header)
    name = "encoder.net.0.bias"
    dup = raw[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    st.write_bytes(join(dup.encode(), body))


# (id, which export, mutator, words the message must contain)
CASES: list[tuple[str, str, Mutator, str]] = [
    # the attacker's report
    ("width1=10^9", "fixed", model_field(width1=10 ** 9), "width1"),
    ("kernel=100001", "fixed", model_field(kernel=100001), "kernel"),
    ("res_blocks=10^6", "fixed", model_field(res_blocks=10 ** 6), "res_blocks"),
    ("frame_size 'abc'", "fixed", top_field(frame_size="abc"), "frame_size"),
    ("frame_size -5", "fixed", top_field(frame_size=-5), "frame_size"),
    ("deep nesting 10^5", "fixed", json_text("[" * 100_000 + "]" * 100_000), "nested"),
    ("json -> /dev/zero", "fixed", symlink_to("/dev/zero", "json"), "regular file"),
    ("unknown top-level field", "fixed", top_field(exec="rm -rf /"), "unknown config field"),
    ("NaN weight", "fixed", set_value("encoder.net.0.weight", float("nan")), "NaN"),
    # sizes and ranges
    ("frame_size 0", "fixed", top_field(frame_size=0), "frame_size"),
    ("frame_size 33 (stride)", "fixed", top_field(frame_size=33), "stride"),
    ("frame_size 10^6", "fixed", top_field(frame_size=10 ** 6), "frame_size"),
    ("frame_size 224.0", "fixed", top_field(frame_size=224.0), "integer"),
    ("frame_size true", "fixed", top_field(frame_size=True), "integer"),
    ("width2=0", "fixed", model_field(width2=0), "width2"),
    ("width2=-8", "fixed", model_field(width2=-8), "width2"),
    ("width2=2048", "fixed", model_field(width2=2048), "width2"),
    ("width1 '4'", "fixed", model_field(width1="4"), "integer"),
    ("width1 4.5", "fixed", model_field(width1=4.5), "integer"),
    ("width1 true", "fixed", model_field(width1=True), "integer"),
    ("width1 null", "fixed", model_field(width1=None), "integer"),
    ("latent_channels 10^6", "fixed", model_field(latent_channels=10 ** 6), "latent_channels"),
    ("kernel even", "fixed", model_field(kernel=4), "odd"),
    ("kernel 17", "fixed", model_field(kernel=17), "kernel"),
    ("res_kernel 0", "fixed", model_field(res_kernel=0), "res_kernel"),
    ("res_blocks -1", "fixed", model_field(res_blocks=-1), "res_blocks"),
    ("linear_path 2", "fixed", model_field(linear_path=2), "linear_path"),
    ("all fields at their caps", "fixed",
     model_field(width1=1024, width2=1024, res_blocks=64, kernel=15, res_kernel=15), "parameters"),
    ("integer of 5000 digits", "fixed", json_replace('"width1": 4', '"width1": ' + "9" * 5000), "JSON"),
    ("unknown model field", "fixed", model_field(depth=3), "unknown model field"),
    ("unknown quantizer field", "fixed", quant_field(dither=1), "unknown quantizer field"),
    # structure of the JSON
    ("json is a list", "fixed", json_text("[]"), "object"),
    ("json is a string", "fixed", json_text('"neural-video-codec"'), "object"),
    ("json is null", "fixed", json_text("null"), "object"),
    ("json empty", "fixed", json_text(""), "JSON"),
    ("json broken", "fixed", json_text("{not json"), "JSON"),
    ("json not utf-8", "fixed", json_text(b'{"format": "\xff"}'), "UTF-8"),
    ("json duplicate key", "fixed",
     json_replace('"frame_size": 32', '"frame_size": 32, "frame_size": 64'), "duplicate"),
    ("json too big", "fixed", huge_json, "bytes"),
    ("json nested 17 deep", "fixed", nested(16), "nested"),
    ("json is a FIFO", "fixed", fifo("json"), "regular file"),
    ("json is a directory", "fixed", directory("json"), "regular file"),
    ("json -> dangling", "fixed", symlink_to("/nonexistent/x.json", "json"), "no weights"),
    ("format wrong", "fixed", top_field(format="pytorch"), "format"),
    ("format missing", "fixed", drop("format"), "format"),
    ("format_version 2", "fixed", top_field(format_version=2), "version"),
    ("format_version true", "fixed", top_field(format_version=True), "version"),
    ("format_version '1'", "fixed", top_field(format_version="1"), "version"),
    ("model missing", "fixed", drop("model"), "model"),
    ("quantizer missing", "fixed", drop("quantizer"), "quantizer"),
    ("model is a list", "fixed", top_field(model=[24]), "object"),
    ("quantizer is a string", "fixed", top_field(quantizer="fixed"), "object"),
    ("training is a list", "fixed", top_field(training=[1]), "training"),
    ("preset is a number", "fixed", top_field(preset=5), "preset"),
    ("preset of 1000 chars", "fixed", top_field(preset="p" * 1000), "preset"),
    ("model_id not hex", "fixed", top_field(model_id="zz"), "model_id"),
    # the quantizer
    ("bits 9", "fixed", quant_field(bits=9), "bits"),
    ("bits 0", "fixed", quant_field(bits=0), "bits"),
    ("bits '6'", "fixed", quant_field(bits="6"), "bits"),
    ("mode unknown", "fixed", quant_field(mode="evil"), "mode"),
    ("lo holds NaN", "fixed", json_replace('"lo": [', '"lo": [NaN, '), "lo"),
    ("lo holds Infinity", "fixed", json_replace('"lo": [', '"lo": [-Infinity, '), "lo"),
    ("lo holds 1e400", "fixed", json_replace('"lo": [', '"lo": [-1e400, '), "lo"),
    ("lo too long", "fixed", quant_field(lo=[-1.0] * 5, hi=[1.0] * 5), "lo"),
    ("lo of 10^5 values", "fixed", quant_field(lo=[-1.0] * 10 ** 5), "lo"),
    ("lo/hi lengths differ", "fixed", quant_field(hi=[1.0] * 3), "lo/hi"),
    ("hi <= lo", "fixed", quant_field(lo=[1.0] * 4, hi=[1.0] * 4), "hi > lo"),
    ("lo not a list", "fixed", quant_field(lo=-1.0), "list"),
    ("lo holds strings", "fixed", quant_field(lo=["-1"] * 4), "lo"),
    ("level 3 in fixed mode", "fixed", quant_field(level=3), "level"),
    ("steps negative", "step", quant_field(steps=[0.1, -0.2]), "steps"),
    ("steps empty in step mode", "step", quant_field(steps=[]), "steps"),
    ("steps 17 levels", "step", quant_field(steps=[0.1] * 17), "steps"),
    ("steps 1e300", "step", quant_field(steps=[0.1, 1e300]), "steps"),
    ("steps 1e-300", "step", quant_field(steps=[0.1, 1e-300]), "steps"),
    ("steps 0", "step", quant_field(steps=[0.1, 0]), "steps"),
    ("level out of range", "step", quant_field(level=2), "level"),
    ("level -1", "step", quant_field(level=-1), "level"),
    # the safetensors file: pickles and structure
    ("pickle behind .safetensors", "fixed", pickle_bytes, "pickle"),
    ("zip behind .safetensors", "fixed", zip_bytes, "pickle/zip"),
    ("safetensors empty", "fixed", st_bytes(lambda b: b""), "truncated"),
    ("safetensors 5 bytes", "fixed", st_bytes(lambda b: b[:5]), "truncated"),
    ("safetensors cut in the header", "fixed", st_bytes(lambda b: b[:100]), "truncated"),
    ("safetensors cut in the data", "fixed", st_bytes(lambda b: b[:-4]), "bytes"),
    ("safetensors trailing bytes", "fixed", st_bytes(lambda b: b + bytes(16)), "after the last tensor"),
    ("header length 2^63", "fixed", header_length(1 << 63), "header length"),
    ("header length 0", "fixed", header_length(0), "safetensors"),
    ("header too big", "fixed",
     st_bytes(lambda b: join(b'{' + b" " * (weights.MAX_HEADER_BYTES + 8) + b'}', b"")), "header"),
    ("header not JSON", "fixed", st_bytes(lambda b: join(b"{nope" + b" " * 3, split(b)[1])), "JSON"),
    ("header nested", "fixed", header_edit(lambda h: h.update(x={"a": [[[1]]]})), "nested"),
    ("header duplicate key", "fixed", duplicate_header_key, "duplicate"),
    ("metadata not strings", "fixed", header_edit(lambda h: h.update(__metadata__={"a": 1})), "__metadata__"),
    ("entry with extra key", "fixed", header_edit(lambda h: h["encoder.net.0.bias"].update(code="x")), "exactly"),
    ("garbage", "fixed", st_bytes(lambda b: b"garbage" * 10), "safetensors"),
    ("safetensors -> /dev/zero", "fixed", symlink_to("/dev/zero", "st"), "regular file"),
    ("safetensors is a FIFO", "fixed", fifo("st"), "regular file"),
    ("safetensors is a directory", "fixed", directory("st"), "regular file"),
    ("safetensors too big (sparse)", "fixed", huge_safetensors, "bytes"),
    # tensors against the config
    ("missing tensor", "fixed", header_edit(lambda h: h.pop("decoder.net.6.0.bias")), "lacks tensors"),
    ("extra tensor", "fixed", tensors_edit(lambda s: s.update(evil=torch.zeros(4))), "unexpected tensors"),
    ("wrong dtype F64", "fixed",
     tensors_edit(lambda s: s.update({"encoder.net.0.bias": s["encoder.net.0.bias"].double()})), "F64"),
    ("wrong dtype F16", "fixed",
     tensors_edit(lambda s: s.update({"encoder.net.0.bias": s["encoder.net.0.bias"].half()})), "F16"),
    ("wrong shape", "fixed",
     tensors_edit(lambda s: s.update({"encoder.net.0.bias": torch.zeros(5)})), "shape"),
    ("config's width2 changed", "fixed", model_field(width2=16), "does not match"),
    ("shape of absurd size", "fixed",
     header_edit(lambda h: h["encoder.net.0.bias"].update(shape=[1 << 40, 1 << 40])), "shape"),
    ("shape negative", "fixed", header_edit(lambda h: h["encoder.net.0.bias"].update(shape=[-4])), "shape"),
    ("offsets past the end", "fixed", offsets(lambda o: [o[0], o[1] + 10 ** 9]), "data_offsets"),
    ("offsets reversed", "fixed", offsets(lambda o: [o[1], o[0]]), "data_offsets"),
    ("offsets not ints", "fixed", offsets(lambda o: [str(o[0]), o[1]]), "data_offsets"),
    ("offsets overlap", "fixed", offsets(lambda o: [o[0] - 4, o[1] - 4]), "overlaps"),
    ("offsets leave a gap", "fixed", offsets(lambda o: [o[0] + 4, o[1] + 4]), "gap"),
    ("offsets swapped", "fixed", header_edit(swap_offsets), "spans"),
    ("Inf weight", "fixed", set_value("decoder.net.6.0.weight", float("inf")), "Inf"),
    ("-Inf bias", "fixed", set_value("encoder.linear.bias", float("-inf")), "Inf"),
    ("NaN running_mean", "fixed", set_value("encoder.net.1.running_mean", float("nan")), "NaN"),
    ("negative running_var", "fixed", set_value("encoder.net.1.running_var", -1.0), "variance"),
    # entropy tables
    ("tables negative", "step",
     tensors_edit(lambda s: s[weights.ENTROPY_KEY].view(-1).__setitem__(0, -1)), "expected"),
    ("tables wrong shape", "step",
     tensors_edit(lambda s: s.update({weights.ENTROPY_KEY: s[weights.ENTROPY_KEY][:1].contiguous()})), "expected"),
    ("tables float", "step",
     tensors_edit(lambda s: s.update({weights.ENTROPY_KEY: s[weights.ENTROPY_KEY].float()})), "dtype"),
    ("tables with a minmax quantizer", "step", quant_field(mode="minmax", steps=[], level=0), "minmax"),
    ("tables of 10^12 counts", "step",
     header_edit(lambda h: h[weights.ENTROPY_KEY].update(shape=[10 ** 6, 4, 9, 256])), "tables"),
]


@pytest.fixture
def no_real_model(monkeypatch):
    """Fail if weights.load builds a real model: crafted files must be refused before that.
    Meta-device builds (the expected tensor shapes, no memory) are allowed."""
    real = weights.CompressiveAutoencoder

    def guarded(cfg: ModelConfig) -> CompressiveAutoencoder:
        assert torch.empty(0).device.type == "meta", "a crafted file got as far as building the model"
        return real(cfg)

    monkeypatch.setattr(weights, "CompressiveAutoencoder", guarded)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_crafted_weights_raise_weights_error_before_building(case, exports, tmp_path, no_real_model):
    _, which, mutate, words = case
    js, st = tmp_path / "m.json", tmp_path / "m.safetensors"
    js.write_bytes(exports[which][0])
    st.write_bytes(exports[which][1])
    mutate(js, st)
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match=words) as info:
            weights.load(js)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak:,} bytes allocated refusing it"
    assert len(str(info.value)) < 600  # messages quote values, never whole inputs


def test_pristine_exports_load(exports, tmp_path):
    for which, (js_bytes, st_bytes_) in exports.items():
        js, st = tmp_path / f"{which}.json", tmp_path / f"{which}.safetensors"
        js.write_bytes(js_bytes)
        st.write_bytes(st_bytes_)
        cfg, _, mid = weights.load(js)
        assert f"{mid:08x}" == json.loads(js_bytes)["model_id"]
        assert (cfg.entropy_counts is not None) == (which == "step")


def test_pickle_suffixes_are_refused_without_reading(tmp_path):
    for suffix in (".pt", ".pth", ".ckpt", ".pkl", ".bin"):
        with pytest.raises(WeightsError, match="pickled checkpoint.*weights.save"):
            weights.load(tmp_path / f"model{suffix}")  # the file need not even exist


def test_pickle_message_points_to_something_that_exists():
    msg = weights.CONVERT_HINT
    assert "training.export" not in msg
    assert "streamer.codec.weights.save" in msg and callable(weights.save)
    assert "safetensors.torch.save_file" in msg


def test_tables_left_unread_are_still_bounded(exports, tmp_path):
    js, st = tmp_path / "m.json", tmp_path / "m.safetensors"
    js.write_bytes(exports["step"][0])
    header, body = split(exports["step"][1])
    # an older context model's tables (other shape): fine for refitting...
    state = st_load(exports["step"][1])
    state[weights.ENTROPY_KEY] = torch.ones(2, 4, 5, 256, dtype=torch.int32)
    st.write_bytes(st_save(state))
    cfg, _, _ = weights.load(js, entropy_tables=False)
    assert cfg.entropy_counts is None
    with pytest.raises(WeightsError, match="expected"):
        weights.load(js)
    # ...but never a huge claim
    header[weights.ENTROPY_KEY]["shape"] = [10 ** 6, 4, 9, 256]
    st.write_bytes(join(header, body))
    with pytest.raises(WeightsError):
        weights.load(js, entropy_tables=False)


def test_parameter_count_matches_the_model():
    rng = random.Random(0)
    configs = list(PRESETS.values())
    for _ in range(20):
        configs.append(ModelConfig(
            latent_channels=rng.randint(1, 32), width1=rng.randint(1, 24), width2=rng.randint(1, 24),
            res_blocks=rng.randint(0, 3), kernel=rng.choice([1, 3, 5, 7]), res_kernel=rng.choice([1, 3, 5]),
            linear_path=rng.randint(0, 1)))
    for cfg in configs:
        assert cfg.parameter_count() == count_parameters(CompressiveAutoencoder(cfg)), cfg


def test_limits_admit_every_preset_and_the_training_configs():
    for cfg in PRESETS.values():
        cfg.validate()
        assert cfg.parameter_count() <= weights.MAX_PARAMETERS
    worst = ModelConfig(**{k: hi if k not in ("kernel", "res_kernel") else 15 for k, (lo, hi) in LIMITS.items()})
    assert worst.parameter_count() > weights.MAX_PARAMETERS  # the per-field caps alone are not enough


@pytest.mark.parametrize("name", ["default", "lite-24x6"])
def test_shipped_weights_load_with_their_recorded_model_id(name):
    js, _ = weights.resolve(name)
    cfg, model, mid = weights.load(name)
    assert f"{mid:08x}" == json.loads(js.read_text())["model_id"]
    assert cfg.frame_size % 8 == 0 and not model.training


# -- no false positives: any header length loads ----------------------------------------------------

def test_1000_exports_with_random_header_padding_all_load(exports, tmp_path):
    """The old check took a first byte of 0x80 (a header length of 0x80 mod 256) for a pickle:
    about one export in 256. Here the header length takes every value mod 256, through random
    metadata (as `save_file` writes it, 8-byte aligned) and random trailing spaces."""
    js_bytes, st_bytes_ = exports["fixed"]
    js, st = tmp_path / "m.json", tmp_path / "m.safetensors"
    js.write_bytes(js_bytes)
    cfg = weights.load_config(js)
    want = json.loads(js_bytes)["model_id"]
    state = st_load(st_bytes_)
    header, body = split(st_bytes_)
    rng = random.Random(1234)
    residues = set()
    for i in range(1000):
        header["__metadata__"] = {"format": weights.FORMAT, "preset": "lite", "pad": "x" * rng.randrange(0, 600)}
        raw = json.dumps(header, separators=(",", ":") if i % 2 else (", ", ": ")).encode()
        spaces = (i - 8 - len(raw)) % 256 + 256 * rng.randrange(0, 3)  # header length = i mod 256
        data = join(raw + b" " * spaces, body)
        residues.add(data[0])
        loaded = weights.tensors_from_bytes(data, st, cfg)  # what load_file_safely does after reading
        assert set(loaded) == set(state)
        if i % 50 == 0 or data[0] == 0x80:  # the whole load from disk (model build included) for some
            st.write_bytes(data)
            assert f"{weights.load(js)[2]:08x}" == want
    assert residues == set(range(256))


def test_save_refuses_what_load_would_refuse(tmp_path):
    codec = NeuralCodec.untrained("lite", frame_size=32, **TINY)
    codec.cfg.frame_size = 36  # not a multiple of the stride
    with pytest.raises(WeightsError, match="stride"):
        weights.save(tmp_path / "m", codec.cfg, codec.model)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "m.safetensors").exists()
