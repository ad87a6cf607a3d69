"""training.conditional: the learned P-frame coder trains, resumes, and is measured beside the
table-based P-frames (on a tiny synthetic cache: moving gradients, real intra weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamer.codec import NeuralCodec
from streamer.codec.codec import to_tensor
from training import conditional as T
from training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """3 clips x 6 frames of a drifting pattern at 224, and their intra latents."""
    out = tmp_path_factory.mktemp("cache")
    yy, xx = np.mgrid[0:224, 0:224]
    clips = []
    for c in range(3):
        frames = [np.stack([(np.sin((xx + 3 * t + 40 * c) / 9.0) * 80 + 128),
                            (np.cos((yy - 2 * t) / 13.0) * 60 + 120),
                            ((xx + yy + 5 * t) % 224)], -1).astype(np.uint8) for t in range(6)]
        clips.append(np.stack(frames))
    pixels = np.stack(clips)
    codec = NeuralCodec.load("default")
    with torch.inference_mode():
        latents = np.stack([codec.encoder(to_tensor(c)).numpy() for c in pixels]).astype(np.float16)
    np.save(out / "pixels.npy", pixels)
    np.save(out / "latents.npy", latents)
    return out


def test_train_writes_a_checkpoint_and_resumes_from_it(tiny_cache, tmp_path, capsys):
    d = tmp_path / "ckpt"
    assert T.main(["train", "--cache", str(tiny_cache), "--dir", str(d), "--steps", "2"]) == 0
    _, _, info = load_checkpoint(d)
    assert info["step"] == 2 and info["levels"] == 7
    assert T.main(["train", "--cache", str(tiny_cache), "--dir", str(d), "--steps", "3"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    state, _, info = load_checkpoint(d)
    assert info["step"] == 3
    assert any(k.startswith("prior2.") for k in state)


def test_train_as_the_sender_rounds_after_warm_up_p_frames(tiny_cache, tmp_path):
    """--deadzone and --warmup (more than 6-frame clips can hold: limited to what they can) train
    and are recorded with the checkpoint, for its export."""
    d = tmp_path / "ckpt"
    assert T.main(["train", "--cache", str(tiny_cache), "--dir", str(d), "--steps", "3",
                   "--deadzone", "0.65", "--warmup", "8"]) == 0
    _, _, info = load_checkpoint(d)
    assert info["step"] == 3 and info["deadzone"] == 0.65 and info["warmup"] == 2


def test_evaluate_reports_both_coders_and_their_bd_rate(tiny_cache, tmp_path):
    d = tmp_path / "ckpt"
    assert T.main(["train", "--cache", str(tiny_cache), "--dir", str(d), "--steps", "1"]) == 0
    out = tmp_path / "report.json"
    assert T.main(["evaluate", "--cache", str(tiny_cache), "--dir", str(d), "--clips", "1",
                   "--anchors", "", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    coders = {r["coder"] for r in report["rows"]}
    assert coders == {"tables", "learned"}
    for r in report["rows"]:
        assert r["kbps"] > 0 and 15 < r["psnr"] < 60
    assert set(report["bd_rate"]) == {"learned_vs_tables", "tables_vs_learned"}


def test_a_missing_cache_is_one_line_and_exit_2(tmp_path, capsys):
    assert T.main(["train", "--cache", str(tmp_path / "nothing"), "--dir", str(tmp_path / "d"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no cache" in err[0]


def test_export_ships_the_checkpoint_and_init_goes_on_from_it(tiny_cache, tmp_path, capsys):
    from streamer.codec import conditional

    d, out = tmp_path / "ckpt", tmp_path / "shipped" / "coder"
    assert T.main(["train", "--cache", str(tiny_cache), "--dir", str(d), "--steps", "2"]) == 0
    assert T.main(["export", "--dir", str(d), "--out", str(out)]) == 0
    coder = conditional.load(out, NeuralCodec.load("default").model_id)
    assert coder.info["training"]["steps"] == 2
    state, _, _ = load_checkpoint(d)
    assert all(torch.equal(v, state[k]) for k, v in coder.state_dict().items())
    # a machine without the checkpoint goes on from the shipped coder
    d2 = tmp_path / "ckpt2"
    assert T.main(["train", "--cache", str(tiny_cache), "--dir", str(d2), "--steps", "3", "--init", str(out)]) == 0
    assert "started from" in capsys.readouterr().out
    assert load_checkpoint(d2)[2]["step"] == 3
    # more levels than the saved coder: its levels kept, the new ones start at the intra steps
    d3 = tmp_path / "ckpt3"
    assert T.main(["train", "--cache", str(tiny_cache), "--dir", str(d3), "--steps", "4", "--init", str(out),
                   "--levels", "9"]) == 0
    state3, _, info3 = load_checkpoint(d3)
    assert info3["levels"] == 9 and state3["log_step"].shape[0] == 9
    steps = NeuralCodec.load("default").cfg.quantizer.steps
    assert torch.allclose(state3["log_step"][8], torch.log(torch.tensor(steps[8])), atol=0.05)  # 2 steps of Adam
    # and the shipped coder is what evaluate measures when there is no checkpoint
    report = tmp_path / "r.json"
    assert T.main(["evaluate", "--cache", str(tiny_cache), "--coder", str(out), "--clips", "1", "--anchors", "",
                   "--no-tables", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["steps_trained"] == 2
