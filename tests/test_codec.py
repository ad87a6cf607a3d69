"""The autoencoder, presets, weights files and the whole frame -> packet -> frame path."""

import json

import numpy as np
import pytest
import torch

from streamer.codec import NeuralCodec, PRESETS, get_preset
from streamer.codec import weights
from streamer.codec.model import CompressiveAutoencoder
from streamer.errors import ConfigError, FrameSizeError, PacketError, WeightsError


def frame(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shapes_stride_8_and_output_range(preset):
    model = CompressiveAutoencoder(get_preset(preset)).eval()
    with torch.no_grad():
        y = model.encode(torch.rand(1, 3, 64, 96))
        x = model.decode(y)
    assert y.shape == (1, get_preset(preset).latent_channels, 8, 12)
    assert x.shape == (1, 3, 64, 96) and x.min() >= 0 and x.max() <= 1


def test_latent_channels_of_the_seed_presets():
    assert [get_preset(n).latent_channels for n in ("facecompressor-96", "facecompressor-48", "facecompressor")] == [96, 48, 24]
    fc = get_preset("facecompressor")
    assert (fc.width1, fc.width2, fc.kernel) == (64, 128, 5)


def test_unknown_preset_and_bad_size():
    with pytest.raises(ConfigError, match="known presets"):
        get_preset("huge")
    codec = NeuralCodec.untrained("lite")
    with pytest.raises(FrameSizeError, match="multiple of 8"):
        codec.encode(frame(60, 64))
    with pytest.raises(FrameSizeError):
        codec.encode(frame()[..., :2].copy())


@pytest.mark.parametrize("preset", ["lite", "facecompressor"])
@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("mode", ["fixed", "minmax"])
def test_image_packet_image_round_trip(preset, bits, mode):
    codec = NeuralCodec.untrained(preset, bits=bits, mode=mode)
    f = frame()
    packets = codec.packets(f, frame_number=3, timestamp_us=99)
    header, out = codec.decode_packet(packets[0])
    assert out.shape == f.shape and out.dtype == np.uint8
    assert header.frame_number == 3 and header.timestamp_us == 99
    assert np.array_equal(out, codec.decode(codec.encode(f)))  # the wire changes nothing


def test_packets_from_another_model_are_refused():
    a, b = NeuralCodec.untrained("lite", seed=1), NeuralCodec.untrained("lite", seed=2)
    assert a.model_id != b.model_id
    with pytest.raises(PacketError, match="model"):
        b.decode_packet(a.packets(frame(), 0)[0])


def test_weights_save_load_round_trip(tmp_path):
    codec = NeuralCodec.untrained("lite", bits=5)
    st, js = weights.save(tmp_path / "m", codec.cfg, codec.model)
    loaded = NeuralCodec.load(js)
    assert loaded.model_id == codec.model_id
    assert loaded.cfg.quantizer.lo == codec.cfg.quantizer.lo and loaded.bits == 5
    f = frame()
    assert np.array_equal(loaded.decode(loaded.encode(f)), codec.decode(codec.encode(f)))
    assert json.loads(js.read_text())["model_id"] == f"{codec.model_id:08x}"
    # loading by either file's path works
    assert NeuralCodec.load(st).model_id == codec.model_id


def test_pickles_and_broken_weights_are_refused(tmp_path):
    codec = NeuralCodec.untrained("lite")
    st, js = weights.save(tmp_path / "m", codec.cfg, codec.model)
    with pytest.raises(WeightsError, match="pickle"):
        weights.load(tmp_path / "model.pt")
    torch.save(codec.model.state_dict(), st)  # a pickle behind a .safetensors name
    with pytest.raises(WeightsError, match="pickle"):
        weights.load(js)
    st.write_bytes(b"garbage" * 10)
    with pytest.raises(WeightsError):
        weights.load(js)
    with pytest.raises(WeightsError, match="no weights"):
        weights.load(tmp_path / "absent")


def test_config_mismatch_and_version_are_refused(tmp_path):
    codec = NeuralCodec.untrained("lite")
    st, js = weights.save(tmp_path / "m", codec.cfg, codec.model)
    d = json.loads(js.read_text())
    d["format_version"] = 99
    js.write_text(json.dumps(d))
    with pytest.raises(WeightsError, match="version"):
        weights.load(js)
    d["format_version"] = 1
    d["model"]["width2"] = 64  # the tensors no longer fit the architecture
    js.write_text(json.dumps(d))
    with pytest.raises(WeightsError, match="does not match"):
        weights.load(js)
    js.write_text("{not json")
    with pytest.raises(WeightsError, match="JSON"):
        weights.load(js)
