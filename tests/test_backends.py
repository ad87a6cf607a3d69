"""Inference backends (streamer.backends): agreement with eager float32, `auto`, errors, the
TensorRT engine cache, and the codec benchmark's plumbing.

Tolerances (the shipped default weights, real frames of the bundled clip that the int8
calibration did not see, 224x224, one torch thread):

| backend  | quantized codes equal | decoder PSNR vs eager output | whole-path PSNR drop |
|----------|-----------------------|------------------------------|----------------------|
| eager    | >= 99.9 %             | >= 60 dB                     | <= 0.01 dB           |
| compile  | >= 99.9 %             | >= 60 dB                     | <= 0.01 dB           |
| int8     | >= 90 % (99.9 % +-1)  | >= 40 dB                     | <= 0.3 dB            |
| GPU fp16 | >= 97 %               | >= 40 dB                     | <= 0.1 dB            |

(measured here: eager and compile 100 % / 96 dB; int8 95 % / 46 dB / 0.12 dB on these frames,
and 93.7 % / 46.2 dB / 0.13 dB on 288 validation frames of other speakers in the codec benchmark.)

Speed is measured by `python -m streamer.bench codec`, never asserted here. Building the compiled
and int8 backends costs ~10 s each (inductor compiles at warm-up), so each is built once per run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from streamer import backends
from streamer.backends import (AUTO_ORDER, BACKENDS, CHOICES, BackendError, add_backend_arguments,
                               apply_backend, apply_backend_from_args, available_backends, compare,
                               resolve_backend)
from streamer.backends import compiled, eager, int8, tensorrt
from streamer.backends.calibration import sample_frames
from streamer.backends.fold import count_batchnorm, fold_decoder, fold_encoder
from streamer.backends.tensorrt import EngineCache, EngineKey
from streamer.codec import NeuralCodec
from streamer.codec.codec import to_tensor

SIZE = 224
HAS_CUDA = torch.cuda.is_available()
HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the sender and receiver run (and as the benchmark measures); module
    scope, so the backends built once per module are built and run under it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """8 real 224x224 frames of the bundled clip that int8 calibration does not use (it takes 16
    evenly spaced ones)."""
    clip = sample_frames(SIZE, None)
    calib = set(np.linspace(0, len(clip) - 1, 16).round().astype(int).tolist())
    unseen = [i for i in range(len(clip)) if i not in calib]
    return clip[unseen[:: max(1, len(unseen) // 8)][:8]]


_SHIPPED: list[NeuralCodec] = []


def load() -> NeuralCodec:
    """A fresh copy of the shipped default model, read from disk once per run: training may
    publish new default weights while the tests run, and a backend built from one file must be
    compared with (and talk to) the same model."""
    if not _SHIPPED:
        _SHIPPED.append(NeuralCodec.load("default"))
    return copy.deepcopy(_SHIPPED[0])


def built(name: str) -> NeuralCodec:
    codec = load()
    apply_backend(codec, name, device="cpu")
    return codec


@pytest.fixture(scope="module")
def int8_codec() -> NeuralCodec:
    if available_backends("cpu")["int8"] is not None:
        pytest.skip(f"int8 backend unavailable here: {available_backends('cpu')['int8']}")
    return built("int8")


# -- agreement with eager float32 ----------------------------------------------------------------

def test_shipped_model_has_batchnorm_to_fold():
    # the folding tests below mean something only if there is BN (with trained stats) to fold
    codec = load()
    assert count_batchnorm(codec.model) > 0
    assert codec.cfg.preset == "lite" and codec.frame_size == SIZE


@pytest.mark.parametrize("pad_mode", ["native", "cat"])
def test_folded_modules_compute_the_model(pad_mode):
    codec = load()
    enc, dec = fold_encoder(codec.model, pad_mode), fold_decoder(codec.model, pad_mode)
    assert count_batchnorm(enc) == 0 and count_batchnorm(dec) == 0
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 96)
    with torch.inference_mode():
        y = codec.model.encoder(x)
        assert torch.allclose(enc(x), y, atol=1e-4, rtol=1e-4)
        assert torch.allclose(dec(y), codec.model.decoder(y), atol=1e-5)
    assert count_batchnorm(codec.model) > 0  # the original is untouched


def test_eager_backend_agrees_with_the_model(frames):
    codec = built("eager")
    assert codec.backend == "eager" and codec.encoder is not codec.model.encoder
    a = compare(codec, frames, batch=1)
    assert a.frames == len(frames)
    assert a.latent_max_abs < 1e-3
    assert a.codes_equal >= 0.999
    assert a.decoder_psnr >= 60.0
    assert abs(a.psnr_drop) <= 0.01


def test_compile_backend_agrees_with_the_model(frames):
    if available_backends("cpu")["compile"] is not None:
        pytest.skip(f"compile backend unavailable here: {available_backends('cpu')['compile']}")
    codec = built("compile")
    assert codec.backend == "compile"
    a = compare(codec, frames, batch=1)
    assert a.latent_max_abs < 1e-3
    assert a.codes_equal >= 0.999
    assert a.decoder_psnr >= 60.0
    assert abs(a.psnr_drop) <= 0.01


def test_int8_backend_agrees_with_the_model(int8_codec, frames):
    a = compare(int8_codec, frames, batch=1)
    assert int8_codec.backend == "int8"
    # int8 really is at work: an fp32 path would agree to ~1e-5
    assert a.latent_max_abs > 1e-3
    assert a.codes_equal >= 0.90
    assert a.codes_within_1 >= 0.999
    assert a.decoder_psnr >= 40.0
    assert a.psnr_drop <= 0.3


def test_int8_keeps_the_sensitive_convs_float():
    """The linear block path's convs and the encoder's first and last convs stay float32; the
    rest (the whole convolutional path of the decoder) runs int8."""
    codec = load()
    assert codec.cfg.model.linear_path == 1
    xs, ys = int8.calibration_batches(codec, sample_frames(SIZE, 4))
    for part, module, batches, stride in (("encoder", fold_encoder(codec.model, "cat"), xs, 8),
                                          ("decoder", fold_decoder(codec.model, "cat", "block"), ys, 1)):
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
        net = [n for n in names if n.startswith("net.")]
        linear = [n for n in names if n.startswith("linear.")]
        assert len(linear) == 1 and len(net) + 1 == len(names)
        keep = int8.float_convs(module, part)
        assert set(keep) == ({net[0], net[-1], *linear} if part == "encoder" else set(linear))
        graph = int8.quantize_module(module, batches, stride=stride, float_layers=keep)
        convs = [n for n in graph.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
        assert len(convs) == len(names)
        # an int8 conv reads a dequantized weight; a float32 one its weight tensor
        int8_convs = [n for n in convs if n.args[1].op == "call_function" and "dequantize" in str(n.args[1].target)]
        assert len(int8_convs) == len(names) - len(keep)


@pytest.mark.parametrize("preset", ["lite", "lite-v1"])
def test_folding_handles_models_with_and_without_the_linear_path(preset):
    codec = NeuralCodec.untrained(preset, frame_size=64, seed=4)
    with torch.no_grad():  # give the zero-started convolutional paths something to compute
        for m in codec.model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.05)
    codec.model.eval()
    x = torch.rand(2, 3, 64, 64)
    for pad_mode, shuffle in (("native", "standard"), ("cat", "block")):
        enc, dec = fold_encoder(codec.model, pad_mode), fold_decoder(codec.model, pad_mode, shuffle)
        assert (enc.linear is not None) == (preset == "lite")
        with torch.inference_mode():
            y = codec.model.encoder(x)
            assert torch.allclose(enc(x), y, atol=1e-4, rtol=1e-4)
            assert torch.allclose(dec(y), codec.model.decoder(y), atol=1e-5)


def test_int8_packets_decode_on_an_eager_receiver(int8_codec, frames):
    """The backend changes neither the packet format nor the model id: an int8 sender talks to an
    eager receiver, which sees nearly the picture an eager sender would have sent."""
    receiver = load()
    assert receiver.model_id == int8_codec.model_id
    f = frames[0]
    header, got = receiver.decode_packet(int8_codec.packets(f, frame_number=1, timestamp_us=0)[0])
    _, ref = receiver.decode_packet(receiver.packets(f, frame_number=1, timestamp_us=0)[0])
    assert header.frame_number == 1 and got.shape == f.shape
    mse = np.mean((got.astype(float) - ref.astype(float)) ** 2)
    assert 10 * np.log10(255.0 ** 2 / max(mse, 1e-12)) >= 30.0


@pytest.mark.slow  # a new shape compiles the int8 graphs again (~20 s)
def test_int8_handles_another_batch_and_size(int8_codec):
    """One int8 graph serves any batch and frame size (exported with dynamic shapes)."""
    x = to_tensor(sample_frames(128, 2))
    with torch.inference_mode():
        y = int8_codec.encoder(x)
        assert y.shape == (2, int8_codec.cfg.model.latent_channels, 16, 16)
        ref = load().model.encoder(x)
        assert float((y - ref).abs().mean()) < 0.1 * float(ref.abs().mean())
        assert int8_codec.decoder(int8_codec.quantizer(y)).shape == (2, 3, 128, 128)


def test_int8_refuses_bad_calibration_frames_and_precision():
    codec = load()
    with pytest.raises(BackendError, match="uint8"):
        apply_backend(codec, "int8", device="cpu", calibration_frames=np.zeros((2, 224, 224, 3), np.float32))
    with pytest.raises(BackendError, match="runs int8"):
        apply_backend(codec, "int8", device="cpu", precision="fp16")
    assert codec.backend == "eager" and codec.encoder is codec.model.encoder  # nothing swapped


# -- choosing a backend --------------------------------------------------------------------------

def test_auto_picks_int8_on_an_x86_cpu_else_eager(monkeypatch):
    expected = "int8" if available_backends("cpu")["int8"] is None else "eager"
    assert resolve_backend("auto", "cpu") == expected
    assert AUTO_ORDER["cpu"][0] == "int8" and "tensorrt" not in AUTO_ORDER["cpu"]
    monkeypatch.setattr(int8, "available", lambda device: "no int8 here")
    assert resolve_backend("auto", "cpu") == "eager"


def test_auto_on_cuda_prefers_tensorrt():
    assert AUTO_ORDER["cuda"][0] == "tensorrt"
    if HAS_CUDA:
        expected = next(b for b in AUTO_ORDER["cuda"] if available_backends("cuda")[b] is None)
        assert resolve_backend("auto", "cuda") == expected


def test_auto_falls_back_when_a_backend_fails_to_build(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("simulated build failure")

    monkeypatch.setattr(int8, "available", lambda device: None)
    monkeypatch.setattr(int8, "build", broken)
    codec = apply_backend(load(), "auto", device="cpu")
    assert codec.backend == "eager"
    assert "simulated build failure" in caplog.text
    with pytest.raises(BackendError, match="int8.*failed to build.*simulated"):
        apply_backend(load(), "int8", device="cpu")


def test_auto_falls_back_when_a_backend_fails_at_warm_up(monkeypatch):
    """A backend that builds but cannot run (say, inductor finds no working compiler) is caught by
    the warm-up call, not on the first frame of a call."""
    def fails_to_run(x):
        raise RuntimeError("simulated kernel compile failure")

    monkeypatch.setattr(int8, "available", lambda device: None)
    monkeypatch.setattr(int8, "build", lambda codec, device, **k: (fails_to_run, fails_to_run))
    assert apply_backend(load(), "auto", device="cpu").backend == "eager"
    with pytest.raises(BackendError, match="simulated kernel compile failure"):
        apply_backend(load(), "int8", device="cpu")
    # without warm-up the broken runner is installed and fails later, as the flag says
    assert apply_backend(load(), "int8", device="cpu", warmup=False).backend == "int8"


def test_warm_up_checks_shapes():
    codec = load()
    with pytest.raises(BackendError, match="latents of shape"):
        backends.warm_up(codec, lambda x: x, codec.model.decoder)


@pytest.mark.skipif(HAS_CUDA and HAS_TORCH_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error():
    with pytest.raises(BackendError) as e:
        apply_backend(load(), "tensorrt")
    assert "pip install .[tensorrt]" in str(e.value)
    assert available_backends()["tensorrt"] is not None
    assert "pip install .[tensorrt]" in available_backends()["tensorrt"]


def test_tensorrt_without_the_package_names_the_extra(monkeypatch):
    """On a CUDA machine without torch-tensorrt the reason names the extra too (simulated: the
    import fails)."""
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # `import torch_tensorrt` -> ImportError
    reason = tensorrt.available(torch.device("cuda"))
    assert reason is not None and "torch-tensorrt is not importable" in reason
    assert "pip install .[tensorrt]" in reason
    assert "pip install .[tensorrt]" in tensorrt.available(CPU)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(BackendError, match="no CUDA GPU"):
        apply_backend(load(), "eager", device="cuda")


@pytest.mark.parametrize("name", ["tensor-rt", "TensorRT", "int4", "fp16", ""])
def test_unknown_backend_names_are_clear_errors(name):
    with pytest.raises(BackendError, match="unknown backend.*choose one of auto, eager, compile, int8, tensorrt"):
        apply_backend(load(), name, device="cpu")


def test_precision_a_backend_does_not_offer():
    with pytest.raises(BackendError, match="runs fp32, not fp16"):
        apply_backend(load(), "eager", device="cpu", precision="fp16")
    with pytest.raises(BackendError, match="runs fp32, not int8"):
        compiled.build(load(), CPU, precision="int8")
    assert eager.check_precision("eager", CPU, None, eager.PRECISIONS) == "fp32"


def test_cli_flags_are_the_shared_ones(capsys):
    ap = argparse.ArgumentParser()
    add_backend_arguments(ap)
    assert CHOICES == ("auto", "eager", "compile", "int8", "tensorrt") and set(BACKENDS) < set(CHOICES)
    for name in CHOICES:
        assert ap.parse_args(["--backend", name]).backend == name
    args = ap.parse_args([])
    assert args.backend == "auto" and args.backend_precision is None and args.backend_cache is None
    with pytest.raises(SystemExit):
        ap.parse_args(["--backend", "tensor-rt"])
    assert "invalid choice" in capsys.readouterr().err
    codec = apply_backend_from_args(load(), ap.parse_args(["--backend", "eager"]), device="cpu")
    assert codec.backend == "eager"


# -- TensorRT: everything that runs without it ----------------------------------------------------

def key(**change) -> EngineKey:
    base = dict(part="encoder", model_id=0x1234ABCD, input_shape=(1, 3, 224, 224), precision="fp16",
                gpu="NVIDIA H100 80GB HBM3 sm_90",
                versions={"torch": "2.13.0", "cuda": "12.8", "torch_tensorrt": "2.13.0", "tensorrt": "10.9.0"})
    base.update(change)
    return EngineKey.make(**base)


@pytest.mark.parametrize("change", [
    {"model_id": 0x1234ABCE},
    {"input_shape": (1, 3, 256, 256)},
    {"input_shape": (8, 3, 224, 224)},
    {"precision": "int8"},
    {"gpu": "NVIDIA A10G sm_86"},
    {"part": "decoder"},
    {"versions": {"torch": "2.13.0", "cuda": "12.8", "torch_tensorrt": "2.13.0", "tensorrt": "10.10.0"}},
    {"versions": {"torch": "2.13.1", "cuda": "12.8", "torch_tensorrt": "2.13.0", "tensorrt": "10.9.0"}},
    {"versions": {"torch": "2.13.0", "cuda": "12.9", "torch_tensorrt": "2.13.0", "tensorrt": "10.9.0"}},
    {"versions": {"torch": "2.13.0", "cuda": "12.8", "torch_tensorrt": "2.13.1", "tensorrt": "10.9.0"}},
])
def test_engine_key_changes_with_everything_an_engine_depends_on(change):
    a, b = key(), key(**change)
    assert a != b and a.digest() != b.digest() and a.filename() != b.filename()


def test_engine_key_is_stable():
    assert key() == key() and key().filename() == key().filename()
    # dict order of the versions does not matter, and the file name says what it holds
    same = key(versions={"tensorrt": "10.9.0", "torch_tensorrt": "2.13.0", "cuda": "12.8", "torch": "2.13.0"})
    assert same.filename() == key().filename()
    assert key().filename().startswith("encoder-1234abcd-1x3x224x224-fp16-")


def test_library_versions_and_gpu_name_in_the_key():
    v = tensorrt.library_versions("fp16")
    assert {"torch", "cuda", "torch_tensorrt", "tensorrt"} <= set(v) and v["torch"] == torch.__version__
    assert "modelopt" in tensorrt.library_versions("int8") and "modelopt" not in v
    if not HAS_TORCH_TENSORRT:
        assert v["torch_tensorrt"] == "absent"
    assert tensorrt.gpu_name(CPU) == "none"


class FakeEngine:
    """A stand-in engine: y = x * k, saved as JSON."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, x):
        return x * self.k


class Recorder:
    def __init__(self, k: float = 2.0) -> None:
        self.k, self.builds, self.loads = k, 0, 0

    def build(self):
        self.builds += 1
        return FakeEngine(self.k)

    def save(self, engine, path: Path) -> None:
        path.write_text(json.dumps({"k": engine.k}))

    def load(self, path: Path):
        self.loads += 1
        return FakeEngine(json.loads(path.read_text())["k"])

    def get(self, cache: EngineCache, k: EngineKey):
        return cache.get(k, self.build, self.save, self.load)


def test_engine_cache_builds_once_then_reloads(tmp_path):
    r = Recorder()
    k = key()
    assert r.get(EngineCache(tmp_path), k)(3.0) == 6.0
    assert (r.builds, r.loads) == (1, 0)
    assert (tmp_path / k.filename()).exists() and json.loads((tmp_path / k.filename()).with_suffix(".json").read_text()) == k.to_dict()
    cache = EngineCache(tmp_path)  # the next start
    assert r.get(cache, k)(3.0) == 6.0
    assert (r.builds, r.loads) == (1, 1) and cache.events == [("hit", k.filename())]
    assert not list(tmp_path.glob("*.tmp"))


def test_engine_cache_is_invalidated_when_the_key_changes(tmp_path):
    r = Recorder()
    cache = EngineCache(tmp_path)
    r.get(cache, key())
    for change in ({"model_id": 0x99}, {"input_shape": (1, 3, 128, 128)}, {"precision": "fp32"},
                   {"gpu": "NVIDIA L4 sm_89"}):
        r.get(cache, key(**change))
    assert r.builds == 5 and r.loads == 0  # no new key reused an engine built for another
    newer = {"torch": "2.13.0", "cuda": "12.8", "torch_tensorrt": "2.14.0", "tensorrt": "10.11.0"}
    r.get(cache, key(versions=newer))
    assert r.builds == 6
    # the engine an older torch-tensorrt built for the same model/part/shape/precision/GPU is gone;
    # the other models', shapes' and GPUs' engines stay
    assert ("removed", key().filename()) in cache.events
    names = {p.name for p in cache.entries()}
    assert key().filename() not in names and key(versions=newer).filename() in names
    assert key(model_id=0x99).filename() in names and key(gpu="NVIDIA L4 sm_89").filename() in names
    assert not (tmp_path / key().filename()).with_suffix(".json").exists()


def test_engine_cache_rebuilds_a_mismatched_or_broken_file(tmp_path):
    r = Recorder()
    cache = EngineCache(tmp_path)
    k = key()
    r.get(cache, k)
    side = (tmp_path / k.filename()).with_suffix(".json")
    stored = json.loads(side.read_text())
    side.write_text(json.dumps({**stored, "precision": "fp32"}))  # a sidecar from another key
    r.get(cache, k)
    assert r.builds == 2 and cache.events[-1] == ("rebuilt", k.filename())
    (tmp_path / k.filename()).write_text("truncated")  # engine file no longer loads
    assert r.get(cache, k)(1.0) == 2.0
    assert r.builds == 3 and r.loads == 1
    side.write_text("{not json")
    r.get(cache, k)
    assert r.builds == 4


def test_engine_cache_leaves_nothing_half_written(tmp_path):
    def bad_save(engine, path):
        path.write_text("partial")
        raise OSError("disk full")

    cache = EngineCache(tmp_path)
    with pytest.raises(OSError):
        cache.get(key(), lambda: FakeEngine(1.0), bad_save, Recorder().load)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMER_CACHE_DIR", str(tmp_path))
    assert tensorrt.default_cache_dir() == tmp_path / "tensorrt"
    monkeypatch.delenv("STREAMER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tensorrt.default_cache_dir() == tmp_path / "xdg" / "neural-video-call" / "tensorrt"


def test_the_graph_tensorrt_is_given():
    """What `build_engine` hands Torch-TensorRT: static-shape exported programs of the folded parts,
    no BatchNorm, no replicate-pad op (slices + concat, which every TensorRT version converts),
    computing what the model computes; and a cache file that round-trips through torch.export."""
    codec = load()
    parts = tensorrt.folded_parts(codec)
    for part, module in parts.items():
        shape = tensorrt.input_shape(codec, part, 1, 64)
        example = tensorrt.engine_example(shape, "fp32", CPU)
        ep = tensorrt.export_for_tensorrt(module, example)
        ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert not any("batch_norm" in o or "replication_pad" in o for o in ops), ops
        assert sum("convolution" in o or "conv2d" in o for o in ops) == sum(
            isinstance(m, nn.Conv2d) for m in getattr(codec.model, part).modules())
        if part == "decoder":
            assert any("pixel_shuffle" in o for o in ops)
        ref = getattr(codec.model, part)
        with torch.inference_mode():
            assert torch.allclose(ep.module()(example), ref(example), atol=1e-4)
    assert tensorrt.input_shape(codec, "decoder", 8, 224) == (8, codec.cfg.model.latent_channels, 28, 28)
    assert tensorrt.engine_example((1, 3, 8, 8), "fp16", CPU).dtype == torch.float16


def test_exported_programs_through_the_engine_cache(tmp_path):
    """The cache with real exported programs (TensorRT's file format without TensorRT)."""
    codec = load()
    module = tensorrt.folded_parts(codec)["decoder"]
    example = tensorrt.engine_example(tensorrt.input_shape(codec, "decoder", 1, 64), "fp32", CPU)
    k = key(part="decoder", model_id=codec.model_id, input_shape=tuple(example.shape), precision="fp32", gpu="none")
    builds = []

    def build():
        builds.append(1)
        return tensorrt.export_for_tensorrt(module, example)

    def load_ep(path):
        return torch.export.load(str(path)).module()

    first = EngineCache(tmp_path).get(k, build, lambda ep, p: torch.export.save(ep, str(p)), load_ep)
    again = EngineCache(tmp_path).get(k, build, lambda ep, p: torch.export.save(ep, str(p)), load_ep)
    assert len(builds) == 1
    with torch.inference_mode():
        assert torch.allclose(again(example), first.module()(example))


def test_tensorrt_build_refuses_the_cpu():
    with pytest.raises(BackendError, match="unavailable.*pip install .\\[tensorrt\\]"):
        tensorrt.build(load(), CPU)


# -- on a GPU (skip here) ---------------------------------------------------------------------------

TRT_MISSING = [what for what, ok in (("a CUDA GPU", HAS_CUDA), ("torch-tensorrt", HAS_TORCH_TENSORRT)) if not ok]


@pytest.mark.tensorrt
@pytest.mark.skipif(bool(TRT_MISSING), reason=f"builds a real TensorRT engine: needs an NVIDIA GPU with CUDA and "
                    f"torch-tensorrt (pip install .[tensorrt]); missing here: {', '.join(TRT_MISSING)}")
@pytest.mark.parametrize("precision, codes, psnr", [("fp16", 0.97, 40.0), ("int8", 0.85, 30.0)])
def test_tensorrt_engine_builds_agrees_and_is_cached(tmp_path, monkeypatch, frames, precision, codes, psnr):
    if precision == "int8" and importlib.util.find_spec("modelopt") is None:
        pytest.skip("int8 TensorRT needs nvidia-modelopt: pip install .[tensorrt]")
    codec = apply_backend(load(), "tensorrt", device="cuda", precision=precision, cache_dir=tmp_path)
    assert codec.backend == "tensorrt" and len(list(tmp_path.glob("*.ep"))) == 2  # encoder, decoder
    a = compare(codec, frames, batch=1)
    assert a.codes_equal >= codes and a.decoder_psnr >= psnr and a.psnr_drop <= 0.3

    def no_rebuild(*args, **kwargs):
        raise AssertionError("engine rebuilt although it is cached")

    monkeypatch.setattr(tensorrt, "build_engine", no_rebuild)
    again = apply_backend(load(), "tensorrt", device="cuda", precision=precision, cache_dir=tmp_path)
    b = compare(again, frames, batch=1)
    assert b.codes_equal == a.codes_equal and b.decoder_psnr == a.decoder_psnr


@pytest.mark.skipif(not HAS_CUDA, reason="GPU backends: needs an NVIDIA GPU with CUDA (none here)")
@pytest.mark.parametrize("name, precision", [("eager", "fp16"), ("eager", "fp32"), ("compile", "fp16")])
def test_gpu_backends_agree_with_the_model(frames, name, precision):
    codec = apply_backend(load(), name, device="cuda", precision=precision)
    a = compare(codec, frames, batch=1)
    floor = (0.999, 60.0) if precision == "fp32" else (0.97, 40.0)
    assert a.codes_equal >= floor[0] and a.decoder_psnr >= floor[1] and a.psnr_drop <= 0.1


# -- the benchmark's plumbing -------------------------------------------------------------------------

def test_codec_bench_runs_and_reports_skips(capsys):
    from streamer.bench import codec as bench

    args = bench.parse_args(["--backend", "eager,tensorrt", "--sizes", "64", "--batch", "1", "--repeats", "3",
                             "--warmup", "1", "--quality-frames", "2", "--json"])
    assert args.threads == 1
    r = bench.run(args)
    assert r["backends"] == ["eager"]
    if not (HAS_CUDA and HAS_TORCH_TENSORRT):
        assert "pip install .[tensorrt]" in r["skipped"]["tensorrt"]
    names = [row["backend"] for row in r["rows"]]
    assert names == [bench.BASELINE, "eager"]
    base, row = r["rows"]
    assert base["speedup"] == 1.0 and row["speedup"] > 0 and row["repeats"] == 3
    assert row["encode_ms"]["median"] > 0 and row["enc_dec_cpu_ms"]["median"] > 0 and row["packet_bytes"] > 42
    # the shipped model codes P-frames: their path is timed too, and a P-frame of a talking head is
    # smaller than its I-frame
    assert row["p_pack_ms"]["median"] > 0 and row["p_unpack_ms"]["median"] > 0
    assert 34 < row["p_packet_bytes"] < row["packet_bytes"]
    assert "p_pack" in bench.report(r)
    # and the shipped learned coder's P-frame path, which gives the receiver the sender's reference
    assert row["learned_p_encode_ms"]["median"] > 0 and row["learned_p_decode_ms"]["median"] > 0
    assert 0 < row["learned_p_bytes"] < row["packet_bytes"] and row["learned_p_references_identical"]
    assert "learned P-frames, lite at 64" in bench.report(r)
    assert r["quality"][0]["backend"] == "eager" and r["quality"][0]["codes_equal"] >= 0.999
    assert "skipped tensorrt" in bench.report(r)
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "100"])


def test_runner_gives_compiled_graphs_one_stride_pattern():
    """Compiled graphs guard on exact strides. A frame from NumPy (`frame[None]`) has stride 0 in
    its batch dimension, which contiguous() keeps: the Runner hands the graph dense strides, so
    the first frame of a call reuses the graph compiled at warm-up instead of compiling again."""
    from streamer.backends.common import Runner

    seen = []
    run = Runner(lambda x: seen.append(x.stride()) or x, CPU, torch.float32)
    frame = np.zeros((224, 224, 3), np.uint8)
    x = to_tensor(frame)
    assert x.stride()[0] != 224 * 224 * 3  # the case this guards against really occurs
    run(x)
    run(torch.zeros(1, 3, 224, 224))
    assert seen == [(224 * 224 * 3, 1, 224 * 3, 3)] * 2
    out = Runner(lambda x: x + 1, CPU, torch.float32, contiguous_out=True)(torch.zeros(2, 3, 8, 8))
    assert out.is_contiguous() and out.dtype == torch.float32 and float(out.min()) == 1.0
