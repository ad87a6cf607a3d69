"""Frame sources: crop/downsample to the model size, latest-frame slot, looping files, clear errors."""

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from streamer.errors import SourceError
from streamer.sources import (BrowserSource, CapturedFrame, FileSource, FrameSlot, SyntheticSource, WebcamSource,
                              decode_jpeg, open_source, prepare)
from streamer.video import VideoWriter

from hostile_pictures import jpeg_claiming, png_claiming, strip_jpeg


@pytest.mark.parametrize("h,w,size", [(480, 640, 224), (288, 360, 224), (720, 1280, 224), (100, 150, 64),
                                      (120, 160, 224), (224, 224, 224)])
def test_prepare_gives_the_model_size(h, w, size):
    raw = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = prepare(raw, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_prepare_crops_the_centre():
    raw = np.zeros((480, 640, 3), np.uint8)
    raw[:, 80:560] = 200  # the centred 480x480 square is bright, the side bands dark
    out = prepare(raw, 224)  # 480 -> side 448 (k=2), then /2
    assert out[4:-4, 4:-4].min() == 200  # (the border is the blur's zero padding, FOMM-style)


def run(coro):
    return asyncio.run(coro)


def test_slot_keeps_only_the_newest_frame():
    async def main():
        slot = FrameSlot()
        slot.bind(asyncio.get_running_loop())
        for i in range(5):
            slot.put(CapturedFrame(np.zeros((1, 1, 3), np.uint8), i, i))
        got = await slot.get()
        assert got.seq == 4 and slot.overwritten == 4
        assert slot.take() is None
    run(main())


def test_synthetic_source_is_paced_and_drops_stale_frames():
    async def main():
        src = SyntheticSource(64, fps=50)
        src.start()
        try:
            first = await asyncio.wait_for(src.frame(), 5)
            assert first.image.shape == (64, 64, 3)
            await asyncio.sleep(0.5)  # a slow encoder: ~25 frames captured meanwhile
            newest = await src.frame()
            assert newest.seq - first.seq >= 5
            assert src.dropped >= newest.seq - first.seq - 2  # overwritten, not queued
            assert abs(newest.timestamp_us / 1e6 - time.time()) < 0.5  # fresh, not stale
            assert src.captured < 60  # paced at ~50 fps, not as fast as possible
        finally:
            src.close()
    run(main())


def test_capture_does_not_block_the_event_loop():
    async def main():
        src = open_source("sample", 224, 30)
        src.start()
        try:
            worst = 0.0
            for _ in range(50):
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - t)
            frame = await asyncio.wait_for(src.frame(), 5)
            assert frame.image.shape == (224, 224, 3)
            assert worst < 0.25  # generous: a shared CPU; decoding in the loop would stall every read
        finally:
            src.close()
    run(main())


def _numbered_clip(path, frames: int, rate: int = 25):
    """A clip whose picture i is grey level 20·i, so a captured picture tells its index."""
    with VideoWriter(path, rate, 96, 80) as w:
        for i in range(frames):
            w.write(np.full((80, 96, 3), 20 * i, np.uint8))
    return path


def _indices(src: FileSource, fps: float, ticks: int) -> list[int | None]:
    """The picture index each of `ticks` captures at `fps` returns, on a clock stepped by hand."""
    out = []
    for k in range(ticks):
        src.clock = lambda k=k: 1000.0 + k / fps
        raw = src._read()
        out.append(None if raw is None else int(round(float(raw.mean()) / 20)))
    return out


def test_file_source_plays_at_the_files_speed_whatever_the_capture_rate(tmp_path):
    path = _numbered_clip(tmp_path / "ten.mp4", 10)
    src = FileSource(path, size=64, fps=30, loop=False)
    try:  # 25 fps captured at 30: each picture once, one in five twice; 0.4 s of clip in 12 captures
        assert _indices(src, 30, 14) == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, None, None]
    finally:
        src.close()
    src = FileSource(path, size=64, fps=12.5, loop=False)
    try:  # captured at half the file's rate: every other picture
        assert _indices(src, 12.5, 6) == [0, 2, 4, 6, 8, None]
    finally:
        src.close()
    src = FileSource(path, size=64, loop=False)
    try:  # the file's own rate by default: every picture once
        assert src.fps == 25 and _indices(src, 25, 11) == list(range(10)) + [None]
    finally:
        src.close()


def test_file_source_loops_and_its_clock_starts_again(tmp_path):
    path = _numbered_clip(tmp_path / "three.mp4", 3)
    src = FileSource(path, size=64, fps=25)
    try:
        assert _indices(src, 25, 7) == [0, 1, 2, 0, 1, 2, 0]
        assert src.loops == 2
        assert src.clip is not None and src.clip[0] == pytest.approx(0.0)  # the clip's start again
    finally:
        src.close()

    async def main():  # and through the capture thread, in real time
        src = FileSource(path, size=64, fps=200)
        src.start()
        try:
            for _ in range(60):
                await asyncio.wait_for(src.frame(), 5)
                if src.loops >= 1:
                    break
                await asyncio.sleep(0.01)
            assert src.loops >= 1  # 0.12 s of clip: it looped
        finally:
            src.close()
    run(main())


def test_a_file_decoding_slower_than_its_clock_lags_instead_of_catching_up_without_end(tmp_path):
    from streamer.sources import MAX_FILE_CATCH_UP
    path = _numbered_clip(tmp_path / "twelve.mp4", 12)
    src = FileSource(path, size=64, fps=25, loop=False)
    try:
        src.clock = lambda: 1000.0
        assert int(round(float(src._read().mean()) / 20)) == 0
        src.clock = lambda: 1010.0  # ten seconds late: one capture decodes a bounded number
        assert int(round(float(src._read().mean()) / 20)) == MAX_FILE_CATCH_UP
        src.clock = lambda: 1010.04  # and the clip goes on from there at its speed
        assert int(round(float(src._read().mean()) / 20)) == MAX_FILE_CATCH_UP + 1
    finally:
        src.close()


def test_sample_is_the_bundled_clip():
    src = open_source("sample", 224, 30)
    try:
        assert src.name == "sample" and isinstance(src, FileSource)
    finally:
        src.close()


def test_missing_webcam_is_a_clear_error():
    with pytest.raises(SourceError, match="no webcam at /dev/video97"):
        WebcamSource("/dev/video97")
    with pytest.raises(SourceError, match="no webcam"):
        open_source("webcam:/dev/video97")


def test_auto_falls_back_to_the_sample(capsys):
    src = open_source("auto", 224, 30)  # no camera on this machine (CI) -> the sample clip
    try:
        if isinstance(src, WebcamSource):
            pytest.skip("a real webcam is attached")
        assert src.name == "sample"
        assert "sample clip" in capsys.readouterr().err
    finally:
        src.close()


def test_unknown_source_and_missing_file():
    with pytest.raises(SourceError, match="unknown source"):
        open_source("webcamm")
    with pytest.raises(SourceError, match="no such file: nope-not-a-file.mp4"):
        open_source("nope-not-a-file.mp4")
    with pytest.raises(SourceError, match="no such file: clips/talk"):
        open_source("clips/talk")
    with pytest.raises(SourceError):
        FileSource("/nonexistent/clip.mp4")


def jpeg_bytes(w=320, h=240, value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_decode_jpeg_and_garbage():
    img = decode_jpeg(jpeg_bytes(640, 480), min_side=224)
    assert img.shape[2] == 3 and min(img.shape[:2]) >= 224
    with pytest.raises(SourceError, match="undecodable"):
        decode_jpeg(b"\xff\xd8garbage")


@pytest.mark.parametrize("name,make", [
    ("65500x65500 JPEG header (a decompression bomb)", lambda: jpeg_claiming(65500, 65500)),
    ("65000x1 JPEG (a 13 GB upscale)", lambda: strip_jpeg(65000, 1)),
    ("12000x12000 PNG", lambda: png_claiming(12000, 12000)),
    ("5000x3000 JPEG header (over the pixel cap)", lambda: jpeg_claiming(5000, 3000)),
    ("garbage", lambda: b"\xff\xd8\xff\xe0 not really"),
])
def test_hostile_camera_pictures_are_source_errors(name, make):
    data = make()
    with pytest.raises(SourceError):
        decode_jpeg(data, min_side=224)


def test_browser_source_survives_hostile_pictures():
    """Each hostile picture is skipped and counted; the next good one still becomes a frame."""
    async def main():
        src = BrowserSource(64, fps=30)
        src.start()
        try:
            for bad in (jpeg_claiming(65500, 65500), strip_jpeg(65000, 1), png_claiming(12000, 12000)):
                src.push_jpeg(bad)
                await asyncio.sleep(0.3)
            src.push_jpeg(jpeg_bytes(160, 120, 60))
            f = await asyncio.wait_for(src.frame(), 5)
            assert abs(int(f.image.mean()) - 60) < 4
            assert src.bad == 3 and src.last_error
        finally:
            src.close()
    run(main())


def test_prepare_enlarges_only_the_centre_square():
    strip = np.zeros((2, 6000, 3), np.uint8)  # enlarging all of it to 224 rows would be 4 GB
    strip[:, 2999:3001] = 255
    out = prepare(strip, 64)
    assert out.shape == (64, 64, 3) and out.mean() > 100  # the centre 2x2 square, enlarged


def test_browser_source_takes_pushed_jpegs():
    async def main():
        src = BrowserSource(64, fps=30)
        src.start()
        try:
            src.push_jpeg(b"not a jpeg")
            await asyncio.sleep(0.2)
            ts = int(time.time() * 1e6) - 1000
            src.push_jpeg(jpeg_bytes(160, 120, 200), ts)
            f = await asyncio.wait_for(src.frame(), 5)
            assert f.image.shape == (64, 64, 3) and abs(int(f.image.mean()) - 200) < 4
            assert f.timestamp_us == ts  # the browser's capture time (same clock)
            assert src.bad == 1
        finally:
            src.close()
    run(main())
