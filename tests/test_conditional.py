"""The learned conditional P-frame coder: integer networks that give the same integers on any
CPU, and a scale-table range coder whose real size is the rate training optimises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.codec.conditional import (K_MAX, REF_FRAC, SCALES, ConditionalCoder, decode_frame, encode_frame,
                                       gaussian_bits, gaussian_coder)
from streamer.codec.gaussian import GaussianCoder, frequencies
from streamer.codec.intnet import ACT_MAX, IntConv2d
from streamer.errors import PacketError

STEPS = [0.05, 0.1, 0.2]


def int64_conv(layer: IntConv2d, x: np.ndarray) -> np.ndarray:
    """The layer's integer path written out in int64 (no floats): the ground truth."""
    w, b, wf = layer.integer_weights()
    w, b = w.numpy().astype(np.int64), b.numpy().astype(np.int64)
    p = layer.k // 2
    xp = np.pad(x.astype(np.int64), ((0, 0), (p, p), (p, p)), mode="edge")
    h, wd = x.shape[1:]
    acc = np.zeros((w.shape[0], h, wd), np.int64) + b[:, None, None]
    for dy in range(layer.k):
        for dx in range(layer.k):
            acc += np.einsum("oc,chw->ohw", w[:, :, dy, dx], xp[:, dy:dy + h, dx:dx + wd])
    shift = wf + layer.frac_in - layer.frac_out
    out = (acc + (1 << (shift - 1))) >> shift if shift > 0 else acc << -shift  # round half up
    return np.clip(out, layer.lo, layer.hi)


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of a trained size: random, with no zero layers (the untrained decoder's last
    layer is zero, which would hide a decoder that is not exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def reference_latents(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(float latents of a frame, the integer reference it follows), latents of a typical range."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.floor(torch.randn(1, 24, 28, 28, generator=g) * 1.5 * (1 << REF_FRAC) + 0.5)
    y = ref / (1 << REF_FRAC) + torch.randn(1, 24, 28, 28, generator=g) * 0.15
    return y, ref


@pytest.mark.parametrize("cin,k,frac_in,frac_out,relu", [(72, 3, 4, 4, True), (48, 1, 4, 0, False), (24, 3, 3, 6, False)])
def test_integer_conv_equals_an_int64_reference(cin, k, frac_in, frac_out, relu):
    torch.manual_seed(cin + k)
    layer = trained_like(IntConv2d(cin, 40, k, frac_in, frac_out, relu))
    x = torch.randint(-ACT_MAX, ACT_MAX + 1, (1, cin, 13, 17)).float()
    assert np.array_equal(layer.exact(x)[0].numpy(), int64_conv(layer, x[0].numpy()))


def test_integer_conv_refuses_a_fan_in_float32_cannot_sum_exactly():
    with pytest.raises(ValueError, match="fan-in"):
        IntConv2d(128, 8, 3, 4, 4, relu=True)


def test_training_forward_is_the_integer_path():
    """Fake quantization sees what the integer path computes (so training optimises the
    network that runs in a call)."""
    layer = trained_like(IntConv2d(48, 48, 3, 4, 4, relu=True))
    x = torch.randint(0, ACT_MAX + 1, (2, 48, 12, 12)).float()
    assert torch.equal(layer(x), layer.exact(x))


def run_both_ends(model: ConditionalCoder, y: torch.Tensor, ref: torch.Tensor, level: int):
    k, index, mu, features = model.encode(y, ref, level)
    return k, index, mu, model.reconstruct(k, mu, features, ref, level)


def test_entropy_parameters_and_reference_are_identical_across_threads_and_backends():
    """What both ends compute (scale indices, means, the next reference from the integers
    that travel) is the same integers with 1 and 2 threads, with and without oneDNN. (The
    sender's float encoder may differ in its last bits: only the sender runs it.)"""
    model = trained_like(ConditionalCoder(STEPS)).eval()
    y, ref = reference_latents()
    k = model.encode(y, ref, 1)[0]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for onednn in (True, False):
                with torch.backends.mkldnn.flags(enabled=onednn):
                    features, mu, index = model.entropy_parameters(ref, k, 1)
                    results.append((index, mu, model.reconstruct(k, mu, features, ref, 1)))
    finally:
        torch.set_num_threads(threads)
    first = results[0]
    assert len(torch.unique(first[0])) > 5  # many different tables in use: the test can tell
    for other in results[1:]:
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def test_the_receiver_rebuilds_the_senders_reference_from_the_payload_alone():
    model = trained_like(ConditionalCoder(STEPS)).eval()
    coder = gaussian_coder()
    y, ref = reference_latents()
    ref_at_receiver = ref.clone()
    for level in (0, 2):  # a chain of P-frames, each against the last
        payload, ref = encode_frame(model, coder, y, ref, level)
        ref_at_receiver = decode_frame(model, coder, payload, ref_at_receiver, level)
        assert torch.equal(ref_at_receiver, ref)
        assert torch.equal(ref, torch.floor(ref))  # integers: a state both ends hold exactly
        y = y + 0.05


def test_a_p_frame_on_another_reference_decodes_to_another_picture_not_a_crash():
    model = trained_like(ConditionalCoder(STEPS)).eval()
    coder = gaussian_coder()
    y, ref = reference_latents()
    for align in (False, True):
        payload, sender_ref = encode_frame(model, coder, y, ref, 1, align=align)
        try:  # the receiver's reference is off: another picture, or a payload that does not decode
            other = decode_frame(model, coder, payload, ref + 256, 1, align=align)
            assert other.shape == sender_ref.shape and not torch.equal(other, sender_ref)
        except PacketError:
            pass
    for junk in (b"", b"\x00" * 8, bytes(range(256)) * 4):
        try:
            decode_frame(model, coder, junk, ref, 1)
        except PacketError:
            pass


def test_untrained_coder_is_residual_coding_in_latent_space():
    """Zero last layers: the reconstruction is the reference plus the rounded change."""
    model = ConditionalCoder(STEPS).eval()
    y, ref = reference_latents()
    _, _, _, y_hat = run_both_ends(model, y, ref, 0)
    err = (y_hat / (1 << REF_FRAC) - y).abs()
    assert err.max() <= STEPS[0] / 2 + 2 ** -REF_FRAC + 1e-6


def coder() -> GaussianCoder:
    return GaussianCoder(frequencies(SCALES, K_MAX))


def test_range_coded_size_matches_the_rate_training_uses():
    g = coder()
    rng = np.random.default_rng(0)
    index = rng.integers(0, 32, (24, 28, 28))
    k = g.clamp(np.rint(rng.normal(0, SCALES[index])).astype(np.int64), index)
    payload = g.encode(k, index)
    assert np.array_equal(g.decode(payload, index), k)
    train_bits = float(gaussian_bits(torch.from_numpy(k).float(), torch.from_numpy(SCALES[index]).float()).sum())
    assert abs(8 * len(payload) / train_bits - 1) < 0.02


def test_a_value_outside_its_table_is_refused_and_clamp_brings_it_in():
    g = coder()
    index = np.zeros((2, 3), np.int64)
    k = np.full((2, 3), 50)
    with pytest.raises(ValueError, match="outside"):
        g.encode(k, index)
    assert np.abs(g.clamp(k, index)).max() == g.half[0]


def test_garbage_payload_decodes_to_something_or_a_packet_error_never_a_crash():
    g = coder()
    rng = np.random.default_rng(3)
    index = rng.integers(0, SCALES.size, (24, 8, 28))
    for n in (0, 1, 4, 64, 4096):
        payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        try:
            out = g.decode(payload, index)
        except PacketError:
            continue
        assert out.shape == index.shape and (np.abs(out) <= g.half[index]).all()


# -- saved coders ------------------------------------------------------------------------------------
def test_a_saved_coder_loads_back_and_codes_the_same_bytes(tmp_path):
    from streamer.codec import conditional

    model = trained_like(ConditionalCoder(STEPS)).eval()
    conditional.save(tmp_path / "c", model, 0x1234ABCD, {"steps": 5, "minutes": 0.1})
    loaded = conditional.load(tmp_path / "c.json", 0x1234ABCD)
    assert loaded.levels == 3 and loaded.info["training"]["steps"] == 5
    y, ref = reference_latents()
    coder = gaussian_coder()
    assert encode_frame(model, coder, y, ref, 1)[0] == encode_frame(loaded, coder, y, ref, 1)[0]


def test_a_saved_coder_for_another_intra_model_or_damaged_is_refused(tmp_path):
    from streamer.codec import conditional
    from streamer.errors import WeightsError

    conditional.save(tmp_path / "c", ConditionalCoder(STEPS), 7, {})
    with pytest.raises(WeightsError, match="trained on intra model"):
        conditional.load(tmp_path / "c", 8)  # its latents would mean something else
    js = tmp_path / "c.json"
    good = js.read_text()
    for bad, why in [("{", "not valid JSON"), (good.replace('"levels": 3', '"levels": 4'), "does not match"),
                     (good.replace('"format_version": 1', '"format_version": 9'), "format_version"),
                     (good.replace('"levels": 3', '"levels": true'), "integers")]:
        js.write_text(bad)
        with pytest.raises(WeightsError, match=why):
            conditional.load(tmp_path / "c", 7)
    js.write_text(good)
    (tmp_path / "c.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WeightsError, match="safetensors"):
        conditional.load(tmp_path / "c", 7)
    with pytest.raises(WeightsError, match="no conditional coder"):
        conditional.load(tmp_path / "missing", 7)


def test_training_with_the_senders_dead_zone_counts_the_bits_of_what_the_sender_sends():
    """`forward(..., deadzone)` rounds as `encode` does and its rate is the ideal code length of
    those integers (within 2 %: the float encoder and the means' rounding differ in last bits),
    with gradients that reach the sender's encoder through the rounding."""
    model = trained_like(ConditionalCoder(STEPS))
    y, ref = reference_latents()
    k, index, _, _ = model.eval().encode(y, ref, 1, deadzone=0.65)
    sent_bits = float(gaussian_bits(k, torch.from_numpy(SCALES).float()[index.long()]).sum())
    _, bits = model.train()(y, ref / (1 << REF_FRAC), torch.tensor([1]), deadzone=0.65)
    assert abs(float(bits.sum()) / sent_bits - 1) < 0.02
    bits.sum().backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0
    plain = model.eval().encode(y, ref, 1)[0]
    assert (k == 0).sum() > (plain == 0).sum()  # the dead zone sends more zeros than rounding
