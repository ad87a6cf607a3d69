import numpy as np
import pytest
import torch

from streamer.codec.quantizer import Quantizer, QuantizerConfig, dequantize
from streamer.errors import ConfigError


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("mode", ["minmax", "fixed"])
def test_codes_in_range_and_dequantize_matches_forward(bits, mode):
    torch.manual_seed(bits)
    q = Quantizer(QuantizerConfig(bits=bits, mode=mode), channels=4)
    y = torch.randn(2, 4, 5, 6) * 3
    if mode == "fixed":
        q.calibrate(y)
    (first, second) = q.quantize(y)
    assert first.codes.dtype == np.uint8 and first.codes.max() <= (1 << bits) - 1
    # the receiver's dequantize equals the sender's forward pass bit for bit
    back = dequantize(first.codes, first.lo, first.hi, bits)
    assert torch.equal(back, q(y)[0])
    # error bounded by half a step (inside the range)
    if mode == "minmax":
        step = (torch.from_numpy(first.hi) - torch.from_numpy(first.lo)) / ((1 << bits) - 1)
        assert ((back - y[0]).abs() <= step.view(-1, 1, 1) / 2 + 1e-2).all()


def test_flat_channel_does_not_divide_by_zero():
    q = Quantizer(QuantizerConfig(bits=6, mode="minmax"), channels=3)
    y = torch.randn(1, 3, 4, 4)
    y[:, 1] = 2.5  # a flat channel: min == max
    (r,) = q.quantize(y)
    assert np.all(r.codes[1] == 0)
    back = dequantize(r.codes, r.lo, r.hi, 6)
    assert torch.isfinite(back).all() and torch.allclose(back[1], torch.tensor(2.5))
    assert torch.isfinite(q(y)).all()


def test_bypass_is_identity_and_has_gradient():
    q = Quantizer(QuantizerConfig(mode="bypass"), channels=2)
    y = torch.randn(1, 2, 3, 3, requires_grad=True)
    assert torch.equal(q(y), y)
    with pytest.raises(ConfigError):
        q.quantize(y)


def test_straight_through_gradient():
    q = Quantizer(QuantizerConfig(bits=4, mode="fixed"), channels=2)
    y = torch.randn(1, 2, 3, 3, requires_grad=True)
    q(y).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


def test_fixed_range_is_frame_independent_and_clips():
    q = Quantizer(QuantizerConfig(bits=6, mode="fixed", lo=[-1.0, -2.0], hi=[1.0, 2.0]), channels=2)
    y = torch.full((1, 2, 2, 2), 10.0)
    (r,) = q.quantize(y)
    assert np.all(r.codes == 63)
    assert np.array_equal(r.lo, np.array([-1.0, -2.0], np.float32))


@pytest.mark.parametrize("cfg", [dict(bits=0), dict(bits=9), dict(mode="log"), dict(lo=[1.0], hi=[0.0]),
                                 dict(lo=[0.0], hi=[1.0, 2.0])])
def test_bad_config_is_a_config_error(cfg):
    with pytest.raises(ConfigError):
        QuantizerConfig(**cfg).validate()


def test_fixed_range_channel_count_checked():
    with pytest.raises(ConfigError, match="channels"):
        Quantizer(QuantizerConfig(mode="fixed", lo=[0.0], hi=[1.0]), channels=3)
