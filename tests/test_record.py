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


def test_sound_and_pictures_share_one_clock(tmp_path):
    """Beeps written 30 ms after their flashes come out of the file 30 ms after them; sound
    that came before the first picture is kept; a gap in the sound is silence, not a jump."""
    from streamer.audio import tone
    from streamer.sources import marked

    from test_audio import beeps_and_flashes, paired

    path = tmp_path / "av.mp4"
    rec = Recorder(path, fps=30, audio=True)
    t0 = 1_700_000_000_000_000 + 500_000  # half-way through a second
    frames = [(t0 + k * 20_000, "a") for k in range(5 * 50)] + [(t0 + 100_000 + k * 40_000, "v") for k in range(118)]
    for ts, kind in sorted(frames):
        if kind == "v":
            img = np.full((64, 64, 3), 60, np.uint8)
            if marked(ts):
                img[:16, :16] = 255  # the flash marker's corner
            rec.write(img, ts, block=True)
        elif not 2_600_000 <= ts - t0 < 2_700_000:  # 100 ms of sound never came
            rec.write_audio(tone(ts, 960), ts + 30_000, block=True)  # heard 30 ms late
    rec.close()
    assert rec.error is None and rec.written == 118 and rec.audio_dropped == 0
    beeps, flashes = beeps_and_flashes(path)
    assert len(beeps) == 5 and len(flashes) == 5  # a marker at each second, 0.5 s into the file
    offsets = paired(beeps, flashes)
    assert len(offsets) == 5 and all(abs(o + 30) <= 3 for o in offsets), offsets  # sound 30 ms late
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        assert a.codec_context.name == "aac" and a.sample_rate == 48000
        samples = sum(f.samples for f in c.decode(audio=0))
    assert samples == pytest.approx(5 * 48000, abs=2048)  # the gap was filled: the length holds
