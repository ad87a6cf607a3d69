"""Video RD evaluation (training/video_eval.py): BD-rate, the anchors' rate control, the
neural-intra coder, the report's rows and keys, and the plug-in path for the call's sessions."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from training import evaluate
from training import video_eval as V

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL = SHARED / "val"

needs_vp8 = pytest.mark.skipif(V.vp8_status() is not None, reason=str(V.vp8_status()))


def synthetic_frames(n: int, size: int = 224, noise: int = 24) -> list[np.ndarray]:
    """The call's synthetic pattern with a drifting texture (so the encoders have work to do)."""
    from streamer.sources import SyntheticSource

    src = SyntheticSource(size)
    tex = np.random.default_rng(0).integers(0, noise, (size + 32, size + 32, 3)).astype(np.int16) - noise // 2
    return [np.clip(src.render(t).astype(np.int16) + tex[t % 32:t % 32 + size, t % 16:t % 16 + size], 0, 255)
            .astype(np.uint8) for t in range(n)]


@pytest.fixture(scope="module")
def codec():
    from streamer.codec import NeuralCodec

    return NeuralCodec.load()


# -- BD-rate --------------------------------------------------------------------------------------

ANCHOR = ([100.0, 150.0, 300.0, 500.0], [33.1, 35.0, 37.6, 39.2])


@pytest.mark.parametrize("method", ["pchip", "cubic"])
@pytest.mark.parametrize("scale,expected", [(0.8, -20.0), (0.5, -50.0), (1.0, 0.0), (1.25, 25.0), (2.0, 100.0)])
def test_bd_rate_of_a_scaled_curve_is_the_scale(method, scale, expected):
    test = ([r * scale for r in ANCHOR[0]], ANCHOR[1])
    assert V.bd_rate(ANCHOR, test, method) == pytest.approx(expected, abs=1e-6)


def test_bd_rate_over_the_common_psnr_range_only():
    # the test curve covers only part of the anchor's PSNR range, with other sample points
    psnrs = [34.0, 35.5, 36.5, 38.0]
    # the anchor's log-rate interpolated at those PSNRs, at 0.8x
    rates = list(np.exp(np.interp(psnrs, ANCHOR[1], np.log(ANCHOR[0]))) * 0.8)
    anchor_linear = (list(np.exp(np.interp(np.linspace(33.1, 39.2, 40), ANCHOR[1], np.log(ANCHOR[0])))),
                     list(np.linspace(33.1, 39.2, 40)))  # dense, so both interpolants agree
    assert V.bd_rate(anchor_linear, (rates, psnrs)) == pytest.approx(-20.0, abs=0.5)
    assert V.bd_psnr_range(anchor_linear, (rates, psnrs)) == pytest.approx([34.0, 38.0])


def test_bd_rate_is_none_without_overlap_or_points():
    assert V.bd_rate(ANCHOR, ([1000.0, 2000.0], [40.0, 42.0])) is None  # PSNR ranges apart
    assert V.bd_rate(ANCHOR, ([1000.0], [36.0])) is None  # one point is no curve
    assert V.bd_rate(ANCHOR, ([600.0, 600.0], [36.0, 36.0])) is None  # the same point twice
    with pytest.raises(ValueError):
        V.bd_rate(ANCHOR, ANCHOR, "linear")


def test_pchip_goes_through_its_points_and_stays_monotone():
    x = np.array([30.0, 32.0, 35.0, 36.0, 40.0])
    y = np.log([80.0, 120.0, 300.0, 330.0, 1200.0])
    d = V._pchip_slopes(x, y)
    assert np.allclose(V._pchip_eval(x, y, d, x), y)
    t = np.linspace(30, 40, 500)
    assert np.all(np.diff(V._pchip_eval(x, y, d, t)) >= -1e-12)


# -- the anchors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["x264", pytest.param("vp8", marks=needs_vp8)])
def test_anchors_hit_their_target(kind):
    clip = V.VideoClip("synthetic", synthetic_frames(60), 30.0)
    for target in (150, 400):
        s = V.summarize([V.run_clip(V.CODERS[kind](None, clip, target, V.FPS), clip, ssim_every=20)])
        assert s["frames"] == 60 and s["packets_per_frame"] == 1.0
        assert abs(s["kbps"] / target - 1) < 0.25, (kind, target, s["kbps"])  # 2 s of video: rough
        assert 15 < s["psnr_mean_of_frames"] < 60 and 0.5 < s["ms_ssim"] <= 1.0


def test_anchor_options_are_a_calls():
    x = V.anchor_options("x264", 300, 30)
    assert x["preset"] == "veryfast" and x["tune"] == "zerolatency"
    assert "bframes=0" in x["x264-params"] and "vbv-maxrate=300" in x["x264-params"]
    v = V.anchor_options("vp8", 300, 30)
    assert v["deadline"] == "realtime" and v["cpu-used"] == "8"
    assert v["minrate"] == v["maxrate"] == "300k"  # min = max = bitrate: libvpx CBR


# -- the call's sessions --------------------------------------------------------------------------

def test_the_session_coder_skips_frames_as_the_sender_does_when_even_the_coarsest_level_is_over(codec):
    """A target below what the coarsest level makes: the sender drops frames (the receiver shows
    the last picture again), and so does the evaluation, so its rate is the call's."""
    from streamer.sources import prepare
    from streamer.video import SAMPLE_CLIP, read_frames

    frames = [prepare(f, 224) for f in read_frames(SAMPLE_CLIP, 30)]
    coder = V.SessionCoder(codec, 20.0, V.FPS)
    sent = []
    for f in frames:
        pkts = coder.encode(f)
        out = coder.decode(pkts)  # a skipped frame still shows a picture
        assert out.shape == f.shape
        sent.append(sum(map(len, pkts)))
    skipped = sum(1 for b in sent if b == 0)
    assert sent[0] > 0 and skipped >= 5, sent
    kbps = sum(sent) * 8 / (len(frames) / V.FPS) / 1000
    every_frame_kbps = min(b for b in sent[1:] if b) * 8 * V.FPS / 1000  # the least sending all would cost
    assert kbps < 0.6 * every_frame_kbps, (kbps, every_frame_kbps)


def test_the_learned_sessions_code_learned_p_frames_and_skip_as_the_sender(codec):
    from streamer.codec.bitstream import header_fields
    from streamer.sources import prepare
    from streamer.video import SAMPLE_CLIP, read_frames

    model, why = V.learned_status(codec)
    assert why is None, why  # the package ships one for its default model
    missing, why = V.learned_status(codec, "/nonexistent/coder")  # --learned-coder: a candidate's path
    assert missing is None and "no conditional coder" in why
    frames = [prepare(f, 224) for f in read_frames(SAMPLE_CLIP, 12)]
    coder = V.SessionCoder(codec, 300.0, V.FPS, model)
    for i, f in enumerate(frames):
        pkts = coder.encode(f)
        assert coder.decode(pkts).shape == f.shape
        if i:  # one message a learned P-frame (SCTP splits it; its parts could not be decoded apart)
            assert len(pkts) == 1 and header_fields(pkts[0])["conditional"]
        else:
            assert all(len(p) <= V.SLICE_BYTES for p in pkts)  # the I-frame's slices
    assert coder.learned_counts == (11, 0)  # every P-frame decoded on the sender's reference
    # a receiver whose reference went wrong asks for (and gets) an I-frame
    coder.dec.last.learned_ref[0, 2, 3, 4] += 1
    coder.decode(coder.encode(frames[0]))
    assert coder.learned_counts[1] == 1
    pkts = coder.encode(frames[1])
    assert not header_fields(pkts[0])["conditional"]  # the I-frame it asked for
    coder.decode(pkts)
    pkts = coder.encode(frames[2])
    coder.decode(pkts)
    assert header_fields(pkts[0])["conditional"] and coder.dec.last.reference_ok
    # far below what the coarsest level costs: frames are skipped, the last picture shown again
    starved = V.SessionCoder(codec, 10.0, V.FPS, model)
    sent = []
    for f in frames:
        pkts = starved.encode(f)
        assert starved.decode(pkts).shape == f.shape
        sent.append(sum(map(len, pkts)))
    assert sent[0] > 0 and sent.count(0) >= 3, sent


# -- the neural intra coder -----------------------------------------------------------------------

def test_neural_intra_slices_and_decodes(codec):
    frames = synthetic_frames(3)
    coder = V.NeuralIntraCoder(codec, codec.levels - 1)
    for f in frames:
        pkts = coder.encode(f)
        assert pkts and all(len(p) <= V.SLICE_BYTES for p in pkts)
        out = coder.decode(pkts)
        assert out.shape == f.shape and out.dtype == np.uint8
    assert coder.memo_key == ("neural-intra", codec.levels - 1)


def test_neural_intra_level_follows_the_target(codec):
    from streamer.sources import prepare
    from streamer.video import SAMPLE_CLIP, read_frames

    # real frames: the coarsest levels' tables are fitted on real faces, and on noise a coarser
    # step can code larger
    clip = V.VideoClip("sample", [prepare(f, 224) for f in read_frames(SAMPLE_CLIP, 4)], 30.0)
    kbps = V.intra_level_bytes(codec, clip) * 8 / clip.seconds / 1000
    assert np.all(np.diff(kbps[1:]) < 0)  # coarser levels, fewer bits (the finest clips its range)
    levels = [V.make_neural_intra(codec, clip, t, V.FPS).level for t in (1.0, float(kbps[3]), 1e6)]
    assert levels == [codec.levels - 1, 3, int(np.argmax(kbps))]


# -- the whole evaluation -------------------------------------------------------------------------

def write_clip(path: Path, frames: list[np.ndarray], fps: int = 25) -> None:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        s.options = {"crf": "12", "preset": "ultrafast"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    big = synthetic_frames(14, size=320)  # 320 px: cropped to 224 (k = 1)
    write_clip(d / "a.mp4", [f[16:256] for f in big])  # 240 x 320
    write_clip(d / "b.mp4", synthetic_frames(12, size=112))  # smaller than the model: enlarged
    (d / "note.txt").write_text("not a video")
    return d


def test_cli_report_rows_and_keys(clip_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = evaluate.main(["--video", "--data", str(clip_dir), "--kbps", "400,150", "--max-frames", "10",
                        "--ssim-every", "5", "--json", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("results", "bd_rate_vs_x264", "bd_rate_vs_vp8", "bd_rate_vs_intra", "machine", "command", "sweep"):
        assert key in report
    assert report["command"].startswith("python -m training.evaluate --video")
    assert report["clips"] == ["a.mp4", "b.mp4"] and report["frames"] == 20
    from streamer.codec import NeuralCodec

    learned = V.learned_status(NeuralCodec.load())[1] is None  # the shipped learned coder fits
    expected = ({"neural-intra", "x264"} | ({"vp8"} if V.vp8_status() is None else set())
                | ({"neural"} if V.session_status() is None else set()) | ({"neural-learned"} if learned else set()))
    assert {r["codec"] for r in report["results"]} == expected
    if V.vp8_status() is not None:
        assert "vp8" in report["skipped"]  # said, not silently dropped
    if V.session_status() is not None:
        assert "neural" in report["skipped"] and report["bd_rate_vs_intra"] is None
    for r in report["results"]:
        for key in ("codec", "target_kbps", "kbps", "psnr_mean_of_frames", "ms_ssim"):
            assert r[key] is not None
        assert r["frames"] == 20 and r["clips"] == 2
    assert sorted({r["target_kbps"] for r in report["results"]}) == [150.0, 400.0]
    for r in report["results"]:  # per clip, in the order of "clips"; together they are the row
        assert len(r["per_clip_kbps"]) == len(r["per_clip_psnr"]) == 2
        assert sum(r["per_clip_kbps"]) / 2 == pytest.approx(r["kbps"], rel=1e-3)  # two clips of 10 frames
        assert min(r["per_clip_psnr"]) <= r["psnr_mean_of_frames"] <= max(r["per_clip_psnr"]) + 1e-3
    ceiling = report["ceiling"]
    assert len(ceiling["per_clip_psnr"]) == 2
    assert min(ceiling["per_clip_psnr"]) <= ceiling["psnr_mean_of_frames"] <= max(ceiling["per_clip_psnr"]) + 1e-3
    intra = [r for r in report["sweep"] if r["codec"] == "neural-intra"]
    assert all(r["psnr_mean_of_frames"] <= ceiling["psnr_mean_of_frames"] + 0.05 for r in intra)  # quantized: below
    md = (out / "video-rd.md").read_text()
    assert "| a.mp4 |" in md and "ceiling" in md
    assert report["sweep"] and all(r["codec"] == "neural-intra" for r in report["sweep"])
    for v in (report["bd_rate_vs_x264"], report["bd_rate_vs_vp8"]):
        assert v is None or isinstance(v, float)
    for name in ("video-rd.json", "video-rd.md", "video-rd.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "video-rd.json").read_text())["results"] == report["results"]


def test_a_registered_session_coder_gets_rows_and_bd_rates(clip_dir, codec, monkeypatch):
    """The hook: registering "neural" is all a session coder needs."""

    class FakeSessions(V.NeuralIntraCoder):  # stands in for EncoderSession/DecoderSession
        memo_key = None

    monkeypatch.setattr(V, "maybe_register_sessions", lambda log=print: None)
    monkeypatch.setitem(V.CODERS, "neural", lambda c, clip, kbps, fps:
                        FakeSessions(c, c.levels - 1 if kbps < 1000 else c.levels - 3))
    report = V.evaluate_video(clip_dir, [150, 5000], max_frames=6, codecs=["neural", "neural-intra", "x264"],
                              codec=codec, ssim_every=3, log=lambda s: None)
    assert [r["codec"] for r in report["results"]][:2] == ["neural", "neural"]
    assert report["bd_rate_codec"] == "neural"
    assert isinstance(report["bd_rate_vs_intra"], float)  # computed (the content is noise: no value to check)
    assert report["bd_rate_vs_vp8"] is None  # not run


def test_session_rows_say_where_the_bits_go(clip_dir, codec):
    """The call's sessions' rows count their I-frames, P-frames and skipped frames, and the I-frames'
    share of the bytes; at a starving target frames are skipped, at a generous one none."""
    report = V.evaluate_video(clip_dir, [20, 5000], max_frames=6, codecs=["neural"], sweep=False,
                              codec=codec, ssim_every=3, log=lambda s: None)
    starved, generous = report["results"]
    for r in (starved, generous):
        assert r["i_frames"] >= r["clips"]  # each clip starts with one
        assert r["i_frames"] + r["coded_p_frames"] + r["skipped_frames"] == r["frames"]
        assert 0 < r["i_frame_bytes_share"] <= 1
    assert starved["skipped_frames"] > 0 and generous["skipped_frames"] == 0
    assert generous["coded_p_frames"] > 0 and generous["i_frame_bytes_share"] < 1


def test_bd_rates_of_a_report_pick_the_best_neural_codec_and_the_intra_sweep():
    sweep = [{"codec": "neural-intra", "kbps": k, "psnr_mean_of_frames": p} for k, p in
             [(650.0, 33.8), (930.0, 35.7), (1080.0, 36.4), (1310.0, 37.4)]]
    rows = [{"codec": "neural-intra", "kbps": 650.0, "psnr_mean_of_frames": 33.8},  # the targets: one point
            *({"codec": "neural", "kbps": r["kbps"] * 0.8, "psnr_mean_of_frames": r["psnr_mean_of_frames"]}
              for r in sweep),
            *({"codec": "x264", "kbps": r["kbps"] * 0.5, "psnr_mean_of_frames": r["psnr_mean_of_frames"]}
              for r in sweep)]
    out = V.bd_rates({"results": rows, "sweep": sweep})
    assert out["bd_rate_codec"] == "neural"
    assert out["bd_rate_vs_intra"] == pytest.approx(-20.0, abs=1e-6)
    assert out["bd_rate_vs_x264"] == pytest.approx(60.0, abs=1e-6)
    assert out["bd_rate_vs_vp8"] is None
    # a second neural codec with fewer bits is the one the top-level BD-rates are of
    learned = [{"codec": "neural-learned", "kbps": r["kbps"] * 0.7, "psnr_mean_of_frames": r["psnr_mean_of_frames"]}
               for r in sweep]
    both = V.bd_rates({"results": rows + learned, "sweep": sweep})
    assert both["bd_rate_codec"] == "neural-learned"
    assert both["bd_rate_vs_x264"] == pytest.approx(40.0, abs=1e-6)
    assert both["bd_rates"]["neural vs x264"] == pytest.approx(60.0, abs=1e-6)
    only_intra = V.bd_rates({"results": [r for r in rows if r["codec"] != "neural"], "sweep": sweep})
    assert only_intra["bd_rate_codec"] == "neural-intra" and only_intra["bd_rate_vs_intra"] is None
    assert only_intra["bd_rate_vs_x264"] == pytest.approx(100.0, abs=1e-6)


def test_bad_arguments_exit_2(clip_dir, capsys):
    assert evaluate.main(["--video", "--data", str(clip_dir), "--kbps", "fast"]) == 2
    assert evaluate.main(["--video", "--data", str(clip_dir), "--codecs", "h265"]) == 2
    assert evaluate.main(["--video", "--data", str(clip_dir / "missing")]) == 2
    err = capsys.readouterr().err
    assert "--kbps" in err and "h265" in err


# -- on the real val clips ------------------------------------------------------------------------

@pytest.mark.skipif(not VAL.is_dir(), reason=f"no val data at {VAL}")
def test_val_clip_at_the_calls_framing():
    clips = V.load_video_clips(VAL, 224, max_frames=30, max_clips=1)
    assert len(clips) == 1 and len(clips[0].frames) == 30
    assert all(f.shape == (224, 224, 3) and f.dtype == np.uint8 for f in clips[0].frames)
    s = V.summarize([V.run_clip(V.CODERS["x264"](None, clips[0], 300, V.FPS), clips[0], ssim_every=10)])
    assert abs(s["kbps"] / 300 - 1) < 0.35 and s["psnr_mean_of_frames"] > 30
