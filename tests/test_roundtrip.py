"""The offline demo: the bundled clip through crop, downsample, codec and packets, to files."""

import json

import av
import numpy as np

from streamer import roundtrip
from streamer.codec import NeuralCodec
from streamer.video import SAMPLE_CLIP, read_frames


def test_roundtrip_writes_video_and_report(tmp_path):
    assert roundtrip.main(["--frames", "4", "--out", str(tmp_path), "--slice-bytes", "1160"]) == 0
    report = json.loads((tmp_path / "roundtrip.json").read_text())
    assert report["frames"] == 4 and report["packets_per_frame"] > 1
    # the shipped model range-codes its latents: far below the fixed-length 24 ch x 6 bit
    # packets (ratio 10.6), and a trained model's picture, not noise
    assert report["range_coded"] and report["compression_ratio"] > 15
    assert report["compression_ratio_payload_only"] is None
    assert report["psnr_db_mean_of_frames"] > 30
    with av.open(str(tmp_path / "roundtrip.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    size = report["frame_size"]
    assert len(frames) == 4 and frames[0].shape == (size, 2 * size, 3)


def test_roundtrip_of_the_fixed_length_seed_operating_point(tmp_path):
    """The packaged `lite-24x6` (24 channels x 6 bits, raw codes): the seed's ratio."""
    assert roundtrip.main(["--frames", "2", "--out", str(tmp_path), "--weights", "lite-24x6"]) == 0
    report = json.loads((tmp_path / "roundtrip.json").read_text())
    assert not report["range_coded"] and report["bits"] == 6
    assert 10.0 < report["compression_ratio"] < 10.67  # 24 ch x 6 bit plus the header
    assert report["compression_ratio_payload_only"] == 24 * 64 / (24 * 6)


def test_sliced_and_whole_frame_decode_identically():
    for codec in (NeuralCodec.untrained("lite"), NeuralCodec.load("default")):
        frame = roundtrip.prepare(next(read_frames(SAMPLE_CLIP)), codec.frame_size)
        assert frame.shape == (224, 224, 3)
        for level in range(codec.levels):
            whole = roundtrip.decode_packets(codec, codec.packets(frame, 0, level=level))
            sliced = codec.packets(frame, 0, max_packet_bytes=1160, level=level)
            assert all(len(p) <= 1160 for p in sliced)
            assert np.array_equal(whole, roundtrip.decode_packets(codec, sliced))


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    assert roundtrip.main(["--source", str(bad), "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_unknown_quantizer_level_is_a_clear_error(tmp_path, capsys):
    from streamer.codec import NeuralCodec

    top = NeuralCodec.load().levels - 1
    assert roundtrip.main(["--level", str(top + 1), "--frames", "1", "--out", str(tmp_path)]) == 2
    assert f"quantizer level {top + 1} outside 0..{top}" in capsys.readouterr().err
