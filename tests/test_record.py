"""The recorder: monotonic timestamps whatever the arrival times, and failures said at once."""

from __future__ import annotations

import threading

import av
import numpy as np
import pytest

from streamer.errors import ConfigError
from streamer.record import Recorder


def frames_in(path) -> list[float]:
    with av.open(str(path)) as c:
        return [f.time for f in c.decode(video=0)]


def record(path, gaps_ms, size=64, block=True) -> Recorder:
    rec = Recorder(path, fps=30)
    ts = 1_700_000_000_000_000
    img = np.zeros((size, size, 3), np.uint8)
    for i, gap in enumerate(gaps_ms):
        img[:] = (i * 7) % 256
        rec.write(img.copy(), ts, block=block)
        ts += int(gap * 1000)
    rec.close()
    return rec


@pytest.mark.parametrize("gap_ms", [40, 33.3, 25, 10])
def test_steady_rates_faster_than_the_stream_rate_record_every_frame(tmp_path, gap_ms):
    rec = record(tmp_path / "r.mp4", [gap_ms] * 90)
    assert rec.error is None
    times = frames_in(tmp_path / "r.mp4")
    assert len(times) == rec.written == 90 - rec.dropped
    assert times[-1] == pytest.approx(89 * gap_ms / 1000, abs=0.002 + rec.dropped * gap_ms / 1000)


def test_jittered_timestamps_record_with_their_timing(tmp_path):
    rng = np.random.default_rng(7)
    gaps = rng.uniform(10, 50, 150)
    gaps[40] = 0.2  # two frames within the same millisecond
    rec = record(tmp_path / "j.mp4", gaps)
    assert rec.error is None and rec.dropped == 0
    times = frames_in(tmp_path / "j.mp4")
    assert len(times) == 150
    assert all(b > a for a, b in zip(times, times[1:]))  # strictly increasing
    assert times[-1] == pytest.approx(gaps[:-1].sum() / 1000, abs=0.01)


def test_out_of_order_timestamps_still_record(tmp_path):
    rec = record(tmp_path / "o.mp4", [33, -50, 33, 33, -10, 40] * 5)
    assert rec.error is None
    assert len(frames_in(tmp_path / "o.mp4")) == 30


def test_a_failed_recording_is_reported_at_once(tmp_path):
    failed = threading.Event()
    messages: list[str] = []

    def on_error(msg: str) -> None:
        messages.append(msg)
        failed.set()

    rec = Recorder(tmp_path / "f.mp4", fps=30, on_error=on_error)
    rec.write(np.zeros((64, 64, 3), np.uint8), 1_000_000)
    rec.write(np.zeros((64, 64), np.uint8), 1_040_000)  # not an RGB picture: the encoder fails
    assert failed.wait(10), "on_error was not called"
    assert "failed" in messages[0] and rec.error == messages[0]
    rec.close()


def test_an_unwritable_path_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot record"):
        Recorder(tmp_path / "file" / "sub.mp4")
