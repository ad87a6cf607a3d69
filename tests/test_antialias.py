"""Tests for streamer.antialias: the fast FOMM downsampler against the literal reference, the
named alternatives, and the frame helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.antialias import (
    METHODS,
    AntiAliasDownsample,
    FommReference,
    centre_crop,
    crop_side_for,
    downsample,
    downsample_frame,
    fomm_reference,
    inverse_scale,
    output_size,
)
from streamer.errors import FrameSizeError

SCALES = [1 / 2, 1 / 3, 1 / 4, 1 / 8]
SMALL_SIZES = [(37, 53), (1, 1), (5, 3), (16, 17)]


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


def _out_hw(h: int, w: int, scale: float) -> tuple[int, int]:
    s = round(1 / scale)
    return (-(-h // s), -(-w // s))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("hw", SMALL_SIZES)
def test_fast_matches_exact_reference(scale: float, hw: tuple[int, int]) -> None:
    h, w = hw
    x = _rand(1, 3, h, w, seed=h * 1000 + w)
    fast = AntiAliasDownsample(3, scale)(x)
    # The reference evaluated in float64 on the same float32 values is the exact answer.
    exact = fomm_reference(x.double(), scale)
    assert fast.dtype == torch.float32
    assert fast.shape == exact.shape == (1, 3, *_out_hw(h, w, scale))
    assert (fast.double() - exact).abs().max().item() <= 1e-6


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("hw", [(480, 640), (37, 53)])
def test_fast_matches_float32_reference(scale: float, hw: tuple[int, int]) -> None:
    h, w = hw
    x = _rand(1, 3, h, w, seed=h + w)
    fast = AntiAliasDownsample(3, scale)(x)
    ref32 = fomm_reference(x, scale)
    assert fast.shape == ref32.shape == (1, 3, *_out_hw(h, w, scale))
    # The float32 reference's own rounding grows with its k×k sum: at 1/8 (29×29 taps) it is
    # alone ~1.3e-6 from the exact value (the fast path is ~3e-7 off), so that scale gets 2e-6.
    tol = 1e-6 if scale >= 1 / 4 else 2e-6
    assert (fast - ref32).abs().max().item() <= tol


def test_fast_matches_reference_float64_and_batches() -> None:
    x = _rand(4, 2, 24, 40, seed=7, dtype=torch.float64)  # H, W divisible: batched path
    for scale in (1 / 2, 1 / 4):
        out = AntiAliasDownsample(2, scale)(x)
        assert out.dtype == torch.float64
        # FOMM builds its kernel in float32, so the float64 reference carries ~1e-8 of
        # kernel rounding; the fast path's float64 taps are exact.
        assert (out - fomm_reference(x, scale)).abs().max().item() <= 1e-7


def test_fast_differentiable_path_matches() -> None:
    x = _rand(1, 3, 29, 31, seed=3).requires_grad_(True)
    mod = AntiAliasDownsample(3, 1 / 3)
    out = mod(x)
    assert out.requires_grad
    assert (out.detach().double() - fomm_reference(x.detach().double(), 1 / 3)).abs().max() <= 1e-6
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_fast_zero_pads_border_like_reference() -> None:
    # Zero padding darkens the border of a constant frame; an implementation that replicated
    # or reflected the edge would keep it at 1.0.
    x = torch.ones(1, 1, 32, 32)
    out = AntiAliasDownsample(1, 1 / 4)(x)
    assert out[0, 0, 0, 0].item() < 0.9
    assert out[0, 0, 4, 4].item() == pytest.approx(1.0, abs=1e-6)
    assert (out - fomm_reference(x, 1 / 4)).abs().max().item() <= 1e-6


def test_scale_one_is_identity() -> None:
    x = _rand(1, 3, 10, 12)
    assert fomm_reference(x, 1.0) is x
    assert AntiAliasDownsample(3, 1.0)(x) is x
    for method in METHODS:
        assert torch.equal(downsample(x, 1.0, method), x)


def test_reference_kernel_is_fomm_shaped() -> None:
    ref = FommReference(3, 1 / 4)
    # sigma = 1.5 → kernel_size = 2*round(6)+1 = 13, depthwise (C,1,k,k), sums to 1.
    assert ref.weight.shape == (3, 1, 13, 13)
    assert ref.weight[0].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert ref.int_inv_scale == 4


@pytest.mark.parametrize("bad", [0.3, 0.0, -0.5, 1.5, 2, float("nan"), float("inf"), 0.26, True])
def test_bad_scale_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        AntiAliasDownsample(3, bad)
    with pytest.raises(ValueError, match="scale"):
        downsample(torch.zeros(1, 3, 8, 8), bad)


def test_inverse_scale_accepts_integer_inverses() -> None:
    assert [inverse_scale(1 / s) for s in (1, 2, 3, 4, 5, 6, 7, 8, 16)] == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    assert output_size(37, 53, 1 / 4) == (10, 14)


def test_bad_method_raises_and_lists_names() -> None:
    with pytest.raises(ValueError) as info:
        downsample(torch.zeros(1, 3, 8, 8), 0.5, "lanczos")
    for name in METHODS:
        assert name in str(info.value)


def test_bad_input_raises() -> None:
    mod = AntiAliasDownsample(3, 0.5)
    with pytest.raises(ValueError):
        mod(torch.zeros(1, 4, 8, 8))  # wrong channel count
    with pytest.raises(ValueError):
        mod(torch.zeros(3, 8, 8))  # missing batch dim
    with pytest.raises(ValueError):
        downsample(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError):
        AntiAliasDownsample(0, 0.5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_shape_and_range(method: str) -> None:
    for scale in (1 / 2, 1 / 3, 1 / 4):
        s = round(1 / scale)
        for h, w in ((48, 64), (37, 53), (3, 2)):
            x = _rand(2, 3, h, w, seed=11)
            out = downsample(x, scale, method)
            assert out.shape == (2, 3, -(-h // s), -(-w // s)), (scale, h, w)
            if h % s == 0 and w % s == 0:
                assert out.shape[2:] == (h // s, w // s)
            assert out.dtype == x.dtype
            assert torch.isfinite(out).all()
            # Bicubic alone may overshoot (negative lobes); keep it bounded.
            slack = 0.25 if method == "bicubic" else 1e-6
            assert out.min().item() >= -slack and out.max().item() <= 1 + slack
        # A constant frame stays constant (away from the gaussian's zero-padded border).
        c = torch.full((1, 3, 48, 64), 0.25)
        cout = downsample(c, scale, method)
        core = cout if method != "gaussian" else cout[:, :, 3:-3, 3:-3]
        assert torch.allclose(core, torch.full_like(core, 0.25), atol=1e-5)


def test_methods_accept_chw_and_gaussian_uses_fast_module() -> None:
    x = _rand(3, 40, 40, seed=5)
    assert downsample(x, 0.25).shape == (3, 10, 10)
    assert torch.allclose(downsample(x, 0.25), fomm_reference(x[None], 0.25)[0], atol=1e-6)


def test_methods_differ_as_expected() -> None:
    x = _rand(1, 3, 64, 64, seed=9)
    sub = downsample(x, 0.25, "subsample")
    assert torch.equal(sub, x[:, :, ::4, ::4])
    assert torch.equal(downsample(x, 0.25, "nearest"), sub)
    assert torch.allclose(downsample(x, 0.25, "avgpool"), x.view(1, 3, 16, 4, 16, 4).mean((3, 5)), atol=1e-6)
    assert torch.allclose(downsample(x, 0.25, "area"), downsample(x, 0.25, "avgpool"), atol=1e-6)
    # Median of a 5×5 window around each kept pixel (reflect padded) — check one interior pixel.
    med = downsample(x, 0.25, "median")
    assert med[0, 1, 3, 5].item() == x[0, 1, 10:15, 18:23].flatten().median().item()
    # A bilateral filter with a tiny colour sigma barely mixes in neighbours → close to subsample;
    # its default output must differ from plain subsampling on noise.
    bil = downsample(x, 0.25, "bilateral")
    assert not torch.allclose(bil, sub, atol=1e-3)


def test_avgpool_partial_window_averages_valid_pixels() -> None:
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 4, 5).contiguous()
    out = downsample(x, 0.5, "avgpool")
    assert out.shape == (1, 1, 2, 3)
    assert out[0, 0, 0].tolist() == [0.5, 2.5, 4.0]


def test_downsample_frame_dtype_shape() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    for method in METHODS:
        out = downsample_frame(frame, 0.25, method)
        assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
        assert out.flags.c_contiguous
    # Matches the float path rounded.
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    want = (fomm_reference(x, 0.25)[0].permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()
    got = downsample_frame(frame, 0.25)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # A white frame stays white in the interior (round trip through [0, 1] is exact).
    white = np.full((32, 32, 3), 255, np.uint8)
    assert (downsample_frame(white, 0.25)[2:-2, 2:-2] == 255).all()
    with pytest.raises(ValueError):
        downsample_frame(frame.astype(np.float32), 0.25)
    with pytest.raises(ValueError):
        downsample_frame(frame[:, :, 0], 0.25)


def test_centre_crop() -> None:
    frame = np.arange(6 * 10 * 3, dtype=np.int32).reshape(6, 10, 3)
    crop = centre_crop(frame, 4)
    assert crop.shape == (4, 4, 3)
    assert np.array_equal(crop, frame[1:5, 3:7])
    assert centre_crop(frame, 6).shape == (6, 6, 3)
    odd = centre_crop(np.zeros((5, 8)), 2)  # 2-D frames work; odd margins floor to top/left
    assert odd.shape == (2, 2)
    assert np.array_equal(centre_crop(np.arange(25).reshape(5, 5), 2), [[6, 7], [11, 12]])
    with pytest.raises(ValueError):
        centre_crop(frame, 7)
    with pytest.raises(FrameSizeError):
        centre_crop(frame, 11)
    with pytest.raises(ValueError):
        centre_crop(frame, 0)


def test_crop_side_for() -> None:
    assert crop_side_for(256, 480, 640) == (256, 1)
    assert crop_side_for(64, 480, 640) == (448, 7)
    assert crop_side_for(64, 720, 1280) == (704, 11)
    assert crop_side_for(128, 128, 300) == (128, 1)
    assert crop_side_for(64, 288, 360) == (256, 4)
    with pytest.raises(ValueError, match="smaller"):
        crop_side_for(256, 240, 320)
    with pytest.raises(ValueError):
        crop_side_for(0, 240, 320)


def test_crop_then_downsample_gives_model_size() -> None:
    frame = np.zeros((288, 360, 3), np.uint8)
    side, k = crop_side_for(64, *frame.shape[:2])
    out = downsample_frame(centre_crop(frame, side), 1 / k)
    assert out.shape == (64, 64, 3)


# --- the fast path itself: row bags (vertical) + block convolution (horizontal) ---------------


@pytest.mark.parametrize("s", [2, 3, 4, 8])
@pytest.mark.parametrize("w", [1, 2, 7, 8, 9, 31, 33, 53, 64, 100, 130])
def test_fast_path_widths_match_reference(s: int, w: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Widths below one chunk (fewer than 16 outputs), exact multiples of the s·16-column chunk,
    # and widths whose last chunk is partly past the frame.
    monkeypatch.setattr(AntiAliasDownsample, "_forward_conv", _no_conv_fallback)
    h = 2 * s + 3
    x = _rand(2, 3, h, w, seed=100 * s + w)
    mod = AntiAliasDownsample(3, 1 / s)
    out = mod(x)
    exact = fomm_reference(x.double(), 1 / s)
    assert out.shape == exact.shape == (2, 3, *_out_hw(h, w, 1 / s))
    assert out.is_contiguous()
    assert (out.double() - exact).abs().max().item() <= 1e-6
    assert len(mod._plans) == 1  # one plan per geometry, reused
    mod(x)
    assert len(mod._plans) == 1


def _no_conv_fallback(self: AntiAliasDownsample, x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the no-grad path must not use the differentiable conv fallback")


def test_fast_path_vga_quarter_is_bags_plus_one_bmm(monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmark's case, 640×480 → 160×120: exactly one embedding_bag and one bmm, no conv.
    calls: list[str] = []
    bag, bmm, conv = torch.nn.functional.embedding_bag, torch.bmm, torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "embedding_bag",
                        lambda *a, **k: calls.append("bag") or bag(*a, **k))
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append("bmm") or bmm(*a, **k))
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda *a, **k: calls.append("conv") or conv(*a, **k))
    monkeypatch.setattr(AntiAliasDownsample, "_forward_conv", _no_conv_fallback)
    x = _rand(1, 3, 480, 640, seed=42)
    out = AntiAliasDownsample(3, 1 / 4)(x)
    assert calls == ["bag", "bmm"]
    assert (out.double() - fomm_reference(x.double(), 1 / 4)).abs().max().item() <= 1e-6


def test_plan_operands_are_the_band_matrices() -> None:
    # The bags and the chunk weights, expanded back into dense matrices, are the banded
    # (zero-padded) Gaussian matrices: rows of Av are the vertical bags, Bh the horizontal pass.
    from streamer.antialias import _horizontal_chunks, _vertical_bags

    mod = AntiAliasDownsample(1, 1 / 4)
    taps = mod.taps64
    k, ka, s = taps.numel(), taps.numel() // 2, 4

    def band(n: int) -> torch.Tensor:
        no = (n - 1) // s + 1
        m = torch.zeros(no, n, dtype=torch.float64)
        for i in range(no):
            for t in range(k):
                if 0 <= i * s - ka + t < n:
                    m[i, i * s - ka + t] = taps[t]
        return m

    for h in (1, 5, 13, 48):
        idx, off, wts = _vertical_bags(2, h, s, taps, torch.device("cpu"), torch.float64)
        av = torch.zeros(2 * ((h - 1) // s + 1), 2 * h, dtype=torch.float64)
        ends = off.tolist()[1:] + [idx.numel()]
        for b, (a, e) in enumerate(zip(off.tolist(), ends)):
            av[b, idx[a:e].long()] = wts[a:e]
        assert torch.equal(av, torch.block_diag(band(h), band(h)))
    for w in (1, 3, 32, 70, 640):
        g, chunks, window, weight, after = _horizontal_chunks(w, s, taps)
        wo = (w - 1) // s + 1
        assert weight.shape == (chunks, window, g) and chunks * g >= wo > (chunks - 1) * g
        # Columns -ka … (last window's end) as a dense matrix; those outside 0 … w-1 must
        # carry no weight (they are neighbouring rows or margin in the buffer).
        cols = ka + s * g * chunks + window
        bh = torch.zeros(chunks * g, cols, dtype=torch.float64)
        for c in range(chunks):
            bh[c * g : (c + 1) * g, s * g * c : s * g * c + window] = weight[c].t()
        assert bh[:, :ka].abs().sum() == 0 and bh[:, ka + w :].abs().sum() == 0
        assert bh[wo:].abs().sum() == 0
        assert torch.equal(bh[:wo, ka : ka + w], band(w))
        assert s * g * (chunks - 1) - ka + window - w == after or after == 0


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4])
def test_frame_path_interleaved_matches_float_reference(
    channels: int, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # downsample_frame's gaussian runs on the HxWxC bytes directly; it must not go through
    # the planar float path, and must equal the reference (rounded) to ±1, nearly everywhere
    # exactly.
    import streamer.antialias as aa

    rng = np.random.default_rng(channels)
    frame = rng.integers(0, 256, size=(45, 61, channels), dtype=np.uint8)
    monkeypatch.setattr(aa, "downsample", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    got = downsample_frame(frame, scale)
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].double() / 255
    want = (fomm_reference(x, scale)[0].permute(1, 2, 0) * 255).round().clamp(0, 255).numpy()
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    assert got.shape == (*_out_hw(45, 61, scale), channels)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2


def test_frame_path_byte_bags_equal_float_bags(monkeypatch: pytest.MonkeyPatch) -> None:
    # The vertical pass reads the frame as bytes (fbgemm's rowwise-uint8 embedding_bag with a
    # unit scale); without that op it converts to float32. Both must give the same frame.
    import streamer.antialias as aa

    rng = np.random.default_rng(7)
    for shape, scale in (((48, 64, 3), 1 / 4), ((37, 29, 1), 1 / 3), ((20, 22, 4), 1 / 2)):
        frame = rng.integers(0, 256, size=shape, dtype=np.uint8)
        monkeypatch.setattr(aa, "_BYTE_BAG_OK", None)
        fast = downsample_frame(frame, scale)
        monkeypatch.setattr(aa, "_BYTE_BAG_OK", False)
        slow = downsample_frame(frame, scale)
        assert fast.shape == slow.shape and fast.flags.c_contiguous
        assert np.array_equal(fast, slow)
