"""training.motion_probe: the aligned-reference bound finds a known translation and nothing in noise."""

import pytest
import torch
import torch.nn.functional as F

from training.motion_probe import residual_ratios, shift_grid, shifted


def smooth_field(seed: int, c: int = 4, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, size, size, generator=g)
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0]


def test_a_translated_frame_is_found_by_the_shift_it_moved():
    y = smooth_field(0)
    moved = shifted(y, 0.5, -0.75)  # half a cell down, three quarters left
    r = residual_ratios([y, moved])
    assert r["global"] < 1e-6 and r["per_block"] < 1e-6
    assert (0.5, -0.75) in shift_grid()


def test_noise_is_not_explained_by_motion():
    frames = [smooth_field(s) for s in range(4)]  # unrelated frames: no shift predicts them
    r = residual_ratios(frames)
    assert r["global"] > 0.8 and r["per_block"] > 0.6  # (a block's min over 81 shifts buys a little)
    assert r["per_block"] <= r["global"] <= 1.0  # per block can only do better than one shift


def test_a_still_clip_gives_one_and_odd_sizes_are_refused():
    y = smooth_field(1)
    assert residual_ratios([y, y.clone()]) == {"global": 1.0, "per_block": 1.0}
    with pytest.raises(ValueError, match="blocks"):
        residual_ratios([y[:, :27], y[:, :27]])


def test_an_aligned_chain_keeps_both_ends_in_step_with_the_shipped_coder():
    import numpy as np

    from streamer.codec import NeuralCodec
    from streamer.codec.conditional import SENDER_DEADZONE, shipped_for
    from streamer.sources import SyntheticSource
    from training.motion_probe import aligned_chain

    codec = NeuralCodec.load("default")
    model = shipped_for(codec.model_id)
    src = SyntheticSource(224)
    with torch.inference_mode():
        y = np.stack([codec.encode_with_latents(src.render(t), 2)[0] for t in range(4)])
    for align in (True, False):  # (it raises when a receiver's reference leaves the sender's)
        bits, lat = aligned_chain(codec, model, y, 3, 2, SENDER_DEADZONE, align=align)
        assert bits > 0 and lat.shape == (4, *y.shape[1:])
