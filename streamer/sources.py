"""Frame sources for the sender: webcam, video file (looped), the bundled sample clip, a
synthetic moving pattern, and a browser's camera (JPEG frames over the signaling socket).

Every source runs its capture in a thread and hands frames over through a `FrameSlot` that
holds only the newest frame: when the encoder is slower than capture, stale frames are
overwritten (counted as dropped) instead of queuing, and the event loop never blocks on a
device. Frames leave a source already at the model's size: a centred square of side
`size * k` is cropped and the anti-alias module shrinks it by `1/k` (`prepare`).

    src = open_source("sample", size=224, fps=30)
    src.start()
    captured = await src.frame()   # CapturedFrame(image (224, 224, 3) uint8, timestamp_us, seq)
"""

from __future__ import annotations

import asyncio
import errno
import io
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from . import antialias
from .errors import FrameSizeError, SourceError
from .video import SAMPLE_CLIP

SOURCE_NAMES = ("auto", "sample", "synthetic", "webcam", "browser")


def now_us() -> int:
    """Capture timestamps: µs since the epoch (the receiver compares them with its own clock)."""
    return time.time_ns() // 1000


# The lip-sync marker: the first MARK_S of every second of the capture clock. The `tone` audio
# source beeps then and a `:flash` source (synthetic:flash, sample:flash) whitens its top-left
# quarter-side square then (streamer/audio.py): a corner, not the whole picture, so the flash
# costs the rate controller little.
MARK_S = 0.1
FLASH_LEVEL = 200  # the corner's mean level in a flash picture (255 sent; the pattern's is lower)


def marked(timestamp_us: int) -> bool:
    """Whether this capture instant is inside a second's marker (beep / flash)."""
    return timestamp_us % 1_000_000 < MARK_S * 1_000_000


def flash_shown(image: np.ndarray) -> bool:
    """Whether a (decoded) picture shows the flash marker."""
    q = max(1, min(image.shape[:2]) // 4)
    return float(image[:q:2, :q:2].mean()) > FLASH_LEVEL


@dataclass
class CapturedFrame:
    image: np.ndarray  # (size, size, 3) uint8 RGB
    timestamp_us: int  # capture time
    seq: int  # capture counter of the source (gaps = frames overwritten before use)


def prepare(frame: np.ndarray, size: int, method: str = "gaussian") -> np.ndarray:
    """Any RGB frame -> (size, size, 3): centre-crop a square of side size*k, shrink by 1/k.

    A frame smaller than the model has its centred square enlarged (Pillow, bicubic) to `size`:
    a tiny browser camera still makes a call instead of an error. Only the square is enlarged,
    so the work is bounded by size² whatever the frame's shape."""
    h, w = frame.shape[:2]
    if min(h, w) < size:
        from PIL import Image

        square = antialias.centre_crop(frame, min(h, w))
        return np.asarray(Image.fromarray(np.ascontiguousarray(square)).resize((size, size), Image.BICUBIC))
    side, k = antialias.crop_side_for(size, h, w)
    square = antialias.centre_crop(frame, side)
    if k == 1:
        return np.ascontiguousarray(square)
    return antialias.downsample_frame(np.ascontiguousarray(square), 1.0 / k, method)


class FrameSlot:
    """The newest frame only. `put` comes from a capture thread; `get` awaits in the loop.

    A frame that is replaced before anyone took it counts in `overwritten` (dropped)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: CapturedFrame | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.overwritten = 0
        self.put_count = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def put(self, item: CapturedFrame) -> None:
        with self._lock:
            if self._item is not None:
                self.overwritten += 1
            self._item = item
            self.put_count += 1
        self._wake()

    def fail(self, error: BaseException) -> None:
        """The capture thread died: the next `get` raises this error."""
        self._error = error
        self._wake()

    def _wake(self) -> None:
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def take(self) -> CapturedFrame | None:
        with self._lock:
            item, self._item = self._item, None
        return item

    async def get(self) -> CapturedFrame:
        if self._event is None:
            self.bind(asyncio.get_running_loop())
        assert self._event is not None
        while True:
            item = self.take()
            if item is not None:
                return item
            if self._error is not None:
                raise self._error
            self._event.clear()
            # re-check: a put may have landed between take() and clear()
            item = self.take()
            if item is not None:
                return item
            await self._event.wait()


class FrameSource:
    """Base class: a capture thread calls `_read` (a raw RGB frame or None to skip), prepares it
    and fills the slot, paced at `fps` unless the device paces itself (`self_paced`)."""

    name = "source"
    self_paced = False
    flash = False  # whiten the corner at each second's marker (the lip-sync measurement's picture)

    def __init__(self, size: int, fps: float) -> None:
        if fps <= 0:
            raise SourceError(f"fps must be positive, got {fps}")
        self.size = size
        self.fps = float(fps)
        self.slot = FrameSlot()
        self.captured = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self.muted = False  # a call's "mute camera": frame() discards what is captured
        self.muted_frames = 0

    # -- public ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start capturing; call from the event loop that will `await frame()`."""
        if self._thread is not None:
            return
        self.slot.bind(loop or asyncio.get_running_loop())
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.name}", daemon=True)
        self._thread.start()

    async def frame(self) -> CapturedFrame:
        """The newest captured frame (waits for one newer than the last taken). While `muted`
        (a call's "mute camera"), frames are taken and discarded: none reaches the encoder."""
        while True:
            captured = await self.slot.get()
            if not self.muted:
                return captured
            self.muted_frames += 1

    @property
    def dropped(self) -> int:
        """Frames captured but replaced by a newer one before the encoder took them."""
        return self.slot.overwritten

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._close_device()

    # -- for subclasses ----------------------------------------------------------------------
    def _read(self) -> np.ndarray | None:
        raise NotImplementedError

    def _close_device(self) -> None:
        pass

    def _emit(self, raw: np.ndarray, timestamp_us: int | None = None) -> None:
        ts = now_us() if timestamp_us is None else timestamp_us
        image = prepare(raw, self.size)
        if self.flash and marked(ts):
            q = max(1, self.size // 4)
            image = image.copy()
            image[:q, :q] = 255
        self._seq += 1
        self.captured += 1
        self.slot.put(CapturedFrame(image, ts, self._seq))

    def _run(self) -> None:
        period = 1.0 / self.fps
        next_t = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self.self_paced:
                    delay = next_t - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                        if self._stop.is_set():
                            break
                    # a late wake-up (busy CPU) skips ahead instead of bursting to catch up
                    next_t = max(next_t + period, time.monotonic() - period)
                ts = now_us()  # paced sources: the picture of this moment
                raw = self._read()
                if raw is None:
                    continue
                if self.self_paced:  # a device's read returns when its frame is ready
                    ts = now_us()
                self._emit(raw, ts)
        except Exception as e:  # noqa: BLE001 - surfaces in the loop as a typed error
            err = e if isinstance(e, SourceError) else SourceError(f"{self.name} capture failed: {e}")
            self.slot.fail(err)


class SyntheticSource(FrameSource):
    """A moving test pattern (drifting colour gradient, bars and a bouncing disc): no files, no
    devices, deterministic per frame index."""

    name = "synthetic"

    def __init__(self, size: int = 224, fps: float = 30.0) -> None:
        super().__init__(size, fps)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self._xx, self._yy = xx, yy
        self._t = 0

    def render(self, t: int) -> np.ndarray:
        """The pattern at frame index t (also used by tests as a reference)."""
        xx, yy = self._xx, self._yy
        phase = t / 30.0
        r = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + phase * 0.25))
        g = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * 1.5 - phase * 0.2))
        b = 0.5 + 0.5 * np.sin(2 * np.pi * ((xx + yy) * 2 + phase * 0.5))
        img = np.stack([r, g, b], axis=-1)
        bars = ((xx * 8 + phase * 0.5) % 1.0) < 0.15
        img[bars] *= 0.3
        cx = 0.5 + 0.3 * np.sin(phase * 1.3)
        cy = 0.5 + 0.3 * np.cos(phase * 0.9)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.012
        img[disc] = (1.0, 0.9, 0.2)
        return (img * 255).astype(np.uint8)

    def _read(self) -> np.ndarray:
        self._t += 1
        return self.render(self._t)


# A file whose pictures take longer to decode than to show falls behind its clock: one capture
# decodes at most this many pictures to catch up, then the clip is let run late.
MAX_FILE_CATCH_UP = 8


class FileSource(FrameSource):
    """A video file, looped forever, played at its own speed and captured at `fps` (the file's
    own rate if fps is None): above the file's rate a picture is captured more than once, below
    it some are passed over, so a 25 fps clip sent at 30 fps is neither fast nor slow, and its
    sound (which follows `clip`) stays at its pitch."""

    name = "file"

    def __init__(self, path: str | Path, size: int = 224, fps: float | None = None, loop: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"no video file at {self.path}")
        self.loop = loop
        self._container: av.container.InputContainer | None = None
        self._frames = None
        # the clip's clock, which the file's sound follows (streamer/audio.py): where in the file
        # (seconds) the picture captured last stands, when it was captured, and how often the
        # clip started again
        self.clip: tuple[float, int] | None = None
        self.loops = -1
        self.clock = time.monotonic  # seconds; tests replace it to step the clip by hand
        self._open()  # fail now (clear message), not in the capture thread
        rate = self._container.streams.video[0].average_rate if self._container else None
        self.file_rate = float(rate) if rate and rate > 0 else 25.0
        self.has_audio = bool(self._container and self._container.streams.audio)
        super().__init__(size, fps or self.file_rate)
        self.name = f"file:{self.path.name}"

    def _open(self) -> None:
        self._close_device()
        try:
            self._container = av.open(str(self.path))
            if not self._container.streams.video:
                raise SourceError(f"{self.path} has no video stream")
            self._container.streams.video[0].thread_type = "AUTO"
            self._frames = self._container.decode(video=0)
            self.loops += 1
        except (av.error.FFmpegError, OSError) as e:
            raise SourceError(f"cannot open video {self.path}: {e}") from None
        # playback state of this pass through the file: when it started (on the first capture),
        # the picture on show, the one decoded ahead (not due yet), and the decoded count
        self._started: float | None = None
        self._shown: tuple[float, np.ndarray] | None = None
        self._ahead: tuple[float, np.ndarray] | None = None
        self._decoded = 0
        self._first_time: float | None = None

    def _decode_next(self) -> tuple[float, np.ndarray] | None:
        """The next picture of this pass and its time from the pass's first picture (seconds);
        None at the end of the file. Streams without timestamps count frames at the file's rate."""
        frame = next(self._frames, None)  # type: ignore[arg-type]
        if frame is None:
            return None
        t = float(frame.time) if frame.time is not None else self._decoded / self.file_rate
        if self._first_time is None:
            self._first_time = t
        self._decoded += 1
        return t - self._first_time, frame.to_ndarray(format="rgb24")

    def _read(self) -> np.ndarray | None:
        for attempt in range(3):
            try:
                now = self.clock()
                if self._started is None:
                    self._started = now
                    self._shown = self._decode_next()
                    if self._shown is None:
                        raise SourceError(f"{self.path}: no decodable frames")
                    self._ahead = self._decode_next()
                t = now - self._started
                # due: a picture whose time has come (1 ms early is close enough: the capture
                # ticks fall just after theirs)
                due = t + 1e-3
                caught_up = 0
                while self._ahead is not None and self._ahead[0] <= due:
                    self._shown, self._ahead = self._ahead, self._decode_next()
                    caught_up += 1
                    if caught_up == MAX_FILE_CATCH_UP:  # decoding slower than the clip: let it
                        self._started, t = now - self._shown[0], self._shown[0]  # lag, bounded
                        due = t + 1e-3
                        break
                if self._ahead is None and due >= self._shown[0] + 1.0 / self.file_rate:
                    # the last picture has had its time: the file is over
                    if not self.loop:
                        self._stop.set()
                        return None
                    self._open()  # reopening is as cheap as seeking and works for every format
                    continue
                self.clip = ((self._first_time or 0.0) + t, now_us())
                return self._shown[1]
            except av.error.FFmpegError:
                self._open()  # damaged data: start the clip again
        raise SourceError(f"{self.path}: no decodable frames")

    def _close_device(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - closing a broken container must not raise
                pass
            self._container = None


def default_webcam() -> tuple[str, str]:
    """(device, PyAV/FFmpeg input format) of the platform's first camera."""
    if sys.platform.startswith("linux"):
        return "/dev/video0", "v4l2"
    if sys.platform == "darwin":
        return "0", "avfoundation"
    if sys.platform.startswith("win"):
        return "video=Integrated Camera", "dshow"
    raise SourceError(f"no webcam support on platform {sys.platform}; use --source sample or a file")


class WebcamSource(FrameSource):
    """A camera through PyAV (v4l2 / avfoundation / dshow); the device sets the pace and any
    resolution works (the frame is centre-cropped and downsampled to the model size)."""

    name = "webcam"
    self_paced = True

    def __init__(self, device: str | None = None, size: int = 224, fps: float = 30.0,
                 video_size: str | None = None) -> None:
        dev, fmt = default_webcam()
        self.device = device or dev
        if fmt == "dshow" and not self.device.startswith("video="):
            self.device = f"video={self.device}"
        options = {"framerate": str(int(round(fps)))}
        if video_size:
            options["video_size"] = video_size
        self._container = None
        try:
            self._container = av.open(self.device, format=fmt, options=options)
            self._frames = self._container.decode(video=0)
        except av.error.FFmpegError as e:
            raise SourceError(self._explain(e, fmt)) from None
        except OSError as e:
            raise SourceError(self._explain(e, fmt)) from None
        super().__init__(size, fps)
        self.name = f"webcam:{self.device}"

    def _explain(self, e: BaseException, fmt: str) -> str:
        code = getattr(e, "errno", None)
        if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO) or (fmt == "v4l2" and not Path(self.device).exists()):
            return (f"no webcam at {self.device}: the device does not exist. Plug a camera in, pass "
                    "--source webcam:DEVICE, or use --source sample / synthetic / a video file.")
        if code == errno.EBUSY:
            return (f"the webcam {self.device} is busy (another program is using it). Close that "
                    "program or use --source sample / synthetic.")
        if code in (errno.EACCES, errno.EPERM):
            return f"no permission to open the webcam {self.device} (on Linux: join the 'video' group)."
        return f"cannot open the webcam {self.device} ({fmt}): {e}"

    def _read(self) -> np.ndarray | None:
        try:
            return next(self._frames).to_ndarray(format="rgb24")
        except StopIteration:
            raise SourceError(f"the webcam {self.device} stopped delivering frames") from None
        except av.error.FFmpegError as e:
            raise SourceError(f"reading the webcam {self.device} failed: {e}") from None

    def _close_device(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001
                pass
            self._container = None


class BrowserSource(FrameSource):
    """Frames of a browser viewer's camera, pushed as JPEG (protocol kind 3) by the signaling
    client. JPEG decoding and the crop/downsample run in the capture thread; only the newest
    JPEG waits there (older ones are dropped unseen)."""

    name = "browser"
    self_paced = True

    def __init__(self, size: int = 224, fps: float = 30.0) -> None:
        super().__init__(size, fps)
        self._jpeg_lock = threading.Lock()
        self._jpeg: tuple[bytes, int] | None = None
        self._have = threading.Event()
        self.received = 0
        self.bad = 0  # undecodable or refused pictures (skipped; the call goes on)
        self.last_error = ""

    def push_jpeg(self, jpeg: bytes, timestamp_us: int | None = None) -> None:
        """Called from the event loop for each kind-3 message; never blocks."""
        now = now_us()
        # the browser's capture time is used when it is plausible (same clock, within 2 s)
        ts = timestamp_us if timestamp_us and abs(now - timestamp_us) < 2_000_000 else now
        with self._jpeg_lock:
            self._jpeg = (bytes(jpeg), ts)
        self.received += 1
        self._have.set()

    def _read(self) -> np.ndarray | None:
        while not self._stop.is_set():
            if self._have.wait(0.2):
                break
        with self._jpeg_lock:
            item, self._jpeg = self._jpeg, None
            self._have.clear()
        if item is None:
            return None
        jpeg, ts = item
        try:
            image = decode_jpeg(jpeg, self.size)
        except SourceError as e:
            self.bad += 1
            self.last_error = str(e)
            return None
        self._pending_ts = ts
        return image

    def _emit(self, raw: np.ndarray, timestamp_us: int | None = None) -> None:
        try:
            super()._emit(raw, getattr(self, "_pending_ts", None))
        except (FrameSizeError, ValueError, MemoryError) as e:  # one bad picture, not the end of the call
            self.bad += 1
            self.last_error = str(e)


# Browser-camera pictures: what a camera sends, with room to spare. The header is checked
# before any pixel is decoded, so a picture that claims more costs nothing.
MAX_CAMERA_PIXELS = 3840 * 2160
MAX_CAMERA_SIDE = 4096
MAX_CAMERA_ASPECT = 4.0  # the call crops a centred square: a 65000x1 strip is no camera


def decode_jpeg(data: bytes, min_side: int = 0) -> np.ndarray:
    """JPEG bytes -> RGB uint8; with min_side, DCT-domain downscaling (Pillow's draft mode)
    keeps at least that many pixels on the short side, which makes large camera frames cheap.

    Only JPEG (the protocol's picture format) of at most MAX_CAMERA_PIXELS, MAX_CAMERA_SIDE on
    a side and MAX_CAMERA_ASPECT, checked from the header before decoding. Any failure is a
    `SourceError`: a hostile or broken picture is skipped and the call goes on."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the checks below are stricter
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if img.format != "JPEG":
            raise SourceError(f"camera frame is {img.format or 'unknown'}, not JPEG")
        if (w * h > MAX_CAMERA_PIXELS or max(w, h) > MAX_CAMERA_SIDE
                or max(w, h) > MAX_CAMERA_ASPECT * max(1, min(w, h))):
            raise SourceError(f"camera frame of {w}x{h} refused (at most {MAX_CAMERA_SIDE} px a side, "
                              f"{MAX_CAMERA_PIXELS} pixels, aspect {MAX_CAMERA_ASPECT:g}:1)")
        if min_side:
            f = min_side / max(1, min(w, h))
            img.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))
        return np.asarray(img.convert("RGB"))
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (DecompressionBombError, ...)
        raise SourceError(f"undecodable camera frame: {type(e).__name__}: {e}") from None


def open_source(spec: str, size: int = 224, fps: float = 30.0, quiet: bool = False) -> FrameSource:
    """A source by name: auto | sample | synthetic | webcam[:DEVICE] | browser | PATH.

    `auto` tries the webcam and falls back to the bundled sample clip with a notice."""
    if spec == "auto":
        try:
            return WebcamSource(None, size, fps)
        except SourceError as e:
            if not quiet:
                print(f"note: {e}\nnote: no usable webcam, sending the bundled sample clip", file=sys.stderr)
            return open_source("sample", size, fps)
    if spec == "sample":
        if not SAMPLE_CLIP.exists():
            raise SourceError(f"the bundled sample clip is missing ({SAMPLE_CLIP})")
        src = FileSource(SAMPLE_CLIP, size, fps)
        src.name = "sample"
        return src
    if spec in ("synthetic:flash", "sample:flash"):  # the lip-sync marker on top (see `marked`)
        src = open_source(spec.partition(":")[0], size, fps, quiet)
        src.flash, src.name = True, spec
        return src
    if spec == "synthetic":
        return SyntheticSource(size, fps)
    if spec == "webcam" or spec.startswith("webcam:"):
        return WebcamSource(spec.partition(":")[2] or None, size, fps)
    if spec == "browser":
        return BrowserSource(size, fps)
    path = Path(spec).expanduser()
    if path.exists():
        return FileSource(path, size, fps)
    if path.suffix or "/" in spec or "\\" in spec:  # meant as a file
        raise SourceError(f"no such file: {spec}")
    raise SourceError(f"unknown source {spec!r}: use one of {', '.join(SOURCE_NAMES)}, webcam:DEVICE, "
                      "or the path of a video file")


__all__ = ["CapturedFrame", "FrameSlot", "FrameSource", "SyntheticSource", "FileSource", "WebcamSource",
           "BrowserSource", "open_source", "prepare", "decode_jpeg", "now_us", "marked", "flash_shown", "FrameSizeError"]
