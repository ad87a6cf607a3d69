"""Training: the loop learns, stage 2 leaves the encoder alone, checkpoints resume, data loads."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training import data as D
from training.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from training.metrics import ms_ssim
from training.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny-test.toml"


def tiny_config(tmp_path: Path, stages=(1,), steps1=60, steps2=10) -> list[str]:
    """Arguments for training.train: the tiny config with its outputs under tmp_path."""
    out = (tmp_path / "run").as_posix()
    return ["--config", str(TINY), "--set", f'out_dir="{out}"', "--set", f'log_dir="{out}/runs"',
            "--set", f"stages={list(stages)}", "--set", f"stage1.max_steps={steps1}",
            "--set", f"stage2.max_steps={steps2}"]


def test_tiny_model_loss_falls(tmp_path):
    state = train(tiny_config(tmp_path, stages=(1,), steps1=60))
    losses = [h["train_loss"] for h in state["history"] if "train_loss" in h]
    assert len(losses) >= 10
    assert losses[-1] < 0.5 * losses[0], losses
    vals = [h["val_psnr"] for h in state["history"] if "val_psnr" in h]
    assert vals and state["best_psnr"] == pytest.approx(max(vals), abs=1e-3)
    assert (tmp_path / "run" / "best-stage1.safetensors").exists()


def test_stage2_freezes_encoder_weights_and_batchnorm_stats(tmp_path):
    train(tiny_config(tmp_path, stages=(1, 2), steps1=15, steps2=15))
    out = tmp_path / "run"
    start = load_file(str(out / "best-stage1.safetensors"))  # what stage 2 started from
    final, _, info = load_checkpoint(out)
    enc = [k for k in final if k.startswith("encoder.")]
    assert any("running_mean" in k for k in enc) and any("weight" in k for k in enc)
    for k in enc:  # weights, biases, running_mean/var and num_batches_tracked all untouched
        assert torch.equal(final[k], start[k]), f"stage 2 changed {k}"
    dec = [k for k in final if k.startswith("decoder.") and k.endswith("weight")]
    assert any(not torch.equal(final[k], start[k]) for k in dec), "stage 2 did not train the decoder"
    q = info["quantizer"]
    assert q["mode"] == "fixed" and q["bits"] == 4 and len(q["lo"]) == 8
    assert "quantized_before_stage2" in info["state"]["metrics"]
    cfg = json.loads((out / "best.json").read_text())
    assert cfg["quantizer"]["mode"] == "fixed" and cfg["training"]["val"]


def test_stage2_freeze_bn_keeps_decoder_statistics_and_trains_its_weights(tmp_path):
    train(tiny_config(tmp_path, stages=(1, 2), steps1=15, steps2=15) + ["--set", "stage2.freeze_bn=true"])
    out = tmp_path / "run"
    start = load_file(str(out / "best-stage1.safetensors"))
    final, _, _ = load_checkpoint(out)
    stats = [k for k in final if k.startswith("decoder.") and ("running_" in k or "num_batches" in k)]
    assert stats
    for k in stats:
        assert torch.equal(final[k], start[k]), f"freeze_bn let {k} move"
    dec = [k for k in final if k.startswith("decoder.") and k.endswith("weight")]
    assert any(not torch.equal(final[k], start[k]) for k in dec), "stage 2 did not train the decoder"


def test_stage2_step_mode_exports_entropy_tables_that_code_packets(tmp_path):
    """A step-mode stage 2 trains through every level and ships tables fitted on training codes:
    the exported codec range-codes packets smaller than raw codes and decodes them exactly."""
    from streamer.codec import NeuralCodec
    from streamer.codec.bitstream import CODING_RANGE, unpack
    from streamer.errors import PacketError

    args = tiny_config(tmp_path, stages=(1, 2), steps1=30, steps2=10) + [
        "--set", 'quantizer.mode="step"', "--set", "quantizer.bits=8",
        "--set", "quantizer.steps=[0.05, 0.1, 0.2]", "--set", "quantizer.level=1"]
    train(args)
    codec = NeuralCodec.load(tmp_path / "run" / "best.json")
    q = codec.cfg.quantizer
    assert q.mode == "step" and q.steps == [0.05, 0.1, 0.2] and q.level == 1 and codec.levels == 3
    counts = codec.cfg.entropy_counts
    assert counts is not None and counts.shape == (3, 8, 9, 256)
    for lv in range(3):  # every channel's tables count the same training positions, none beyond its alphabet
        sizes, _ = codec.quantizer.alphabet(lv)
        assert len(set(counts[lv].sum(axis=(1, 2)).tolist())) == 1
        assert all(counts[lv, c, :, sizes[c]:].sum() == 0 for c in range(8))
    frames = train_frames_like_the_tiny_config()
    codings = []
    for lv in range(3):
        qz = codec.encode(frames[0], lv)
        (packet,) = codec.pack(qz, 0, 0)
        p = codec.unpack(packet)
        assert p.header.level == lv and np.array_equal(p.codes, qz.codes)
        codings.append(p.header.coding)
        if p.header.coding == CODING_RANGE:
            with pytest.raises(PacketError, match="entropy tables"):
                unpack(packet)  # without the model's tables a range-coded packet cannot be read
    assert CODING_RANGE in codings, codings


def test_keep_init_fine_tunes_the_decoder_and_keeps_codes_and_every_table(tmp_path):
    """[quantizer] keep_init: stage 2 on shipped step-mode weights trains the decoder only and
    exports the init's quantizer, intra tables and P-frame residual tables unchanged, so a sender
    with the new weights sends the codes it sent before; the provenance names the init."""
    from streamer.codec import NeuralCodec, residual
    from streamer.codec import weights as W

    step_mode = ["--set", 'quantizer.mode="step"', "--set", "quantizer.bits=8",
                 "--set", "quantizer.steps=[0.05, 0.1, 0.2]", "--set", "quantizer.level=1"]
    train(tiny_config(tmp_path / "a", stages=(1, 2), steps1=30, steps2=5) + step_mode)
    first = NeuralCodec.load(tmp_path / "a" / "run" / "best.json")
    frames = train_frames_like_the_tiny_config()
    with torch.inference_mode():
        y = first.model.encoder(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    first.set_residual_counts(residual.fit_levels(first.quantizer, [y]))
    W.save(tmp_path / "init", first.cfg, first.model)
    first = NeuralCodec.load(tmp_path / "init.json")

    # a config whose own quantizer says otherwise: keep_init must ignore it
    train(tiny_config(tmp_path / "b", stages=(2,), steps2=10) + [
        "--set", 'quantizer.mode="step"', "--set", "quantizer.bits=8", "--set", "quantizer.steps=[0.3, 0.6]",
        "--set", "quantizer.keep_init=true", "--set", f'init_from="{(tmp_path / "init.json").as_posix()}"'])
    tuned = NeuralCodec.load(tmp_path / "b" / "run" / "best.json")
    assert tuned.cfg.quantizer.to_dict() == first.cfg.quantizer.to_dict()
    assert np.array_equal(tuned.cfg.entropy_counts, first.cfg.entropy_counts)
    assert np.array_equal(tuned.cfg.residual_counts, first.cfg.residual_counts)
    a = first.model.state_dict()
    final, _, _ = load_checkpoint(tmp_path / "b" / "run")  # where training ended (best.json: best by val)
    for b in (tuned.model.state_dict(), final):
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    assert any(not torch.equal(a[k], final[k]) for k in a if k.startswith("decoder.") and k.endswith("weight"))
    for lv in range(3):
        assert np.array_equal(tuned.encode(frames[1], lv).codes, first.encode(frames[1], lv).codes)
    assert tuned.cfg.training["decoder_of"]["model_id"] == f"{first.model_id:08x}"


def test_keep_init_without_init_from_is_a_config_error(tmp_path):
    from streamer.errors import ConfigError
    with pytest.raises(ConfigError, match="keep_init"):
        train(tiny_config(tmp_path, stages=(2,)) + ["--set", "quantizer.keep_init=true"])


def train_frames_like_the_tiny_config() -> np.ndarray:
    from training.train import synthetic_frames
    return synthetic_frames(4, 32, seed=0)


def test_laplace_rate_is_the_bits_of_the_quantization_bin():
    from training.train import LaplaceRate

    rate = LaplaceRate(1)
    with torch.no_grad():
        rate.log_scale.fill_(math.log(0.7))
    step, b = 0.25, 0.7
    for v in (0.0, 0.05, 0.4, -1.3, 6.0):
        xs = np.linspace(v - step / 2, v + step / 2, 20001)
        p = np.trapezoid(np.exp(-np.abs(xs) / b) / (2 * b), xs)  # the density over the bin, numerically
        bits = float(rate(torch.tensor([[[[v]]]]), step).detach())
        assert bits == pytest.approx(-np.log2(p), rel=1e-4, abs=1e-4), v


def test_rate_weight_shrinks_the_latents(tmp_path):
    """Stage 1 with a rate term pays for bits: its latents end smaller than without it."""
    from streamer.codec import NeuralCodec
    from training.train import synthetic_frames

    frames = torch.from_numpy(synthetic_frames(8, 32, seed=3)).permute(0, 3, 1, 2).float() / 255
    sizes = {}
    for weight in (0.0, 0.05):
        out = tmp_path / f"w{weight}"
        train(tiny_config(out, stages=(1,), steps1=40) + ["--set", f"stage1.rate_weight={weight}",
                                                           "--set", "stage1.rate_step=0.5"])
        codec = NeuralCodec.load(out / "run" / "best-stage1.json")
        with torch.no_grad():
            sizes[weight] = float(codec.model.encoder(frames).abs().mean())
    assert sizes[0.05] < 0.7 * sizes[0.0], sizes


def test_resume_continues_from_checkpoint(tmp_path):
    args = tiny_config(tmp_path, stages=(1,), steps1=10)
    train(args)
    s = train(args + ["--resume", "--set", "stage1.max_steps=20"])
    assert s["step"] == 20  # 10 more steps, not 20 from scratch


def test_checkpoint_roundtrip_without_pickle(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, m, opt, {"step": 1})
    head = (tmp_path / "ckpt.safetensors").read_bytes()[:2]
    assert head[:1] != b"\x80" and head != b"PK"  # not a pickle, not a torch zip
    state, opt_t, info = load_checkpoint(tmp_path)
    m2 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    m2.load_state_dict(state)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    restore_optimizer(opt2, opt_t, info["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    for i in a["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))


def write_video(path: Path, frames: int, fps: int = 10, size: int = 64) -> None:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), (i * 20) % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def test_folder_cache_samples_every_n_seconds_and_skips_corrupt_files(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_video(src / "a.mp4", frames=25, fps=10)  # 2.5 s
    from PIL import Image
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(src / "sub" / "b.png")
    (src / "broken.mp4").write_bytes(b"not a video at all")
    paths = D.folder_sources(src)
    assert [p.name for p in paths] == ["a.mp4", "broken.mp4", "b.png"]
    cache = D.FrameCache(paths, size=32, every_s=1.0, cache_dir=tmp_path / "cache")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        cache.build(progress=False)
    assert [Path(s).name for s, _ in cache.skipped] == ["broken.mp4"]
    assert [a.shape for a in cache.arrays] == [(3, 32, 32, 3), (1, 32, 32, 3)]  # t = 0, 1, 2 s
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    again = D.FrameCache(paths, size=32, every_s=1.0, cache_dir=tmp_path / "cache")
    again.decode = None  # a cache hit must not decode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.build(progress=False)
    assert again.num_frames == 4
    crops = D.RandomCrops(cache, crop=16)
    x = crops[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1


def test_voxceleb_layout_split_is_identity_disjoint(tmp_path):
    for ident in range(10):
        for vid in range(2):
            d = tmp_path / "dev" / f"id{ident:05d}" / f"vid{vid}"
            d.mkdir(parents=True)
            for u in range(2):
                (d / f"{u:05d}.mp4").write_bytes(b"")
    paths = D.voxceleb_sources(tmp_path, "dev")
    assert len(paths) == 40
    tr, va = D.split_identities(paths, val_fraction=0.2, seed=1)
    ids_tr = {D.voxceleb_identity(p) for p in tr}
    ids_va = {D.voxceleb_identity(p) for p in va}
    assert len(ids_va) == 2 and not ids_tr & ids_va and len(tr) + len(va) == 40
    assert len(D.build_sources(tmp_path, "voxceleb", "dev", "train", 0.2, utterances=5, seed=1)) == 5


def test_ms_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    a = (rng.random((192, 192, 3)) * 255).astype(np.uint8)
    assert float(ms_ssim(a, a)[0]) == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    slight = np.clip(a.astype(int) + rng.integers(-3, 3, a.shape), 0, 255).astype(np.uint8)
    assert float(ms_ssim(a, noisy)[0]) < float(ms_ssim(a, slight)[0]) < 1.0
    small = a[:64, :64]  # fewer scales fit; still defined
    assert 0 < float(ms_ssim(small, slight[:64, :64])[0]) < 1


@pytest.mark.skipif(not (SHARED / "val" / "still").is_dir(), reason="../shared/data is absent")
def test_val_still_framed_as_the_call():
    p = next(iter(sorted((SHARED / "val" / "still").iterdir())))
    f = D.frame_to_square(D.read_image(p), 224)
    assert f.shape == (224, 224, 3) and f.dtype == np.uint8


def test_pca_start_is_the_linear_block_codec():
    """With the linear path set from PCA and the convolutional paths at their zero start, the
    model computes exactly the projection onto the leading principal components of 8x8 blocks."""
    from streamer.codec import CompressiveAutoencoder, get_preset, to_tensor
    from training.pca import block_vectors, init_linear_path, principal_components
    from training.train import synthetic_frames

    frames = synthetic_frames(16, 64, seed=3)
    model = CompressiveAutoencoder(get_preset("lite", latent_channels=8, width1=8, width2=16)).eval()
    explained = init_linear_path(model, frames)
    v = block_vectors(frames)
    mean, comps = principal_components(v, 8)
    rec = ((v - mean) @ comps.T) @ comps + mean  # (blocks, 3*8*8), in [-0.5, 0.5]
    n, bh, bw = len(frames), 64 // 8, 64 // 8
    rec = rec.reshape(n, bh, bw, 3, 8, 8).transpose(0, 3, 1, 4, 2, 5).reshape(n, 3, 64, 64) + 0.5
    with torch.no_grad():
        out = model(to_tensor(frames)).numpy()
    assert np.abs(out - np.clip(rec, 0, 1)).max() < 1e-4
    assert 0.5 < explained < 1.0
    # more components explain more, and a model without the path refuses the start
    assert init_linear_path(CompressiveAutoencoder(get_preset("lite", latent_channels=16, width1=8, width2=16)), frames) > explained
    with pytest.raises(ValueError, match="no linear path"):
        init_linear_path(CompressiveAutoencoder(get_preset("lite-v1", latent_channels=8, width1=8, width2=16)), frames)


def test_linear_path_must_be_0_or_1():
    from streamer.codec import get_preset
    from streamer.errors import ConfigError

    with pytest.raises(ConfigError, match="linear_path"):
        get_preset("lite", linear_path=2)
