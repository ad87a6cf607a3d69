"""`python -m streamer.receive`: the receiving end of a call.

Joins a room on the call server, answers the sender's WebRTC offer, reassembles latent slices
into frames (concealing lost rows with the previous frame's latents) in a parse thread, decodes
the newest frame in a decode thread, and shows it: records it (`--record out.mp4`) and
publishes it as JPEG (kind 1, latest only, at most --fps) to the room's browser viewers. Prints
when a call opens, when the sender leaves and comes back, and one stats line a second during a
call, and sends the same numbers to viewers. Nothing a packet holds runs on the event loop: the
signaling and the stats go on whatever arrives.

    python -m streamer.receive --url 'http://127.0.0.1:8765/?room=demo&token=...&role=receiver' --ice-address 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import json
import sys
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from . import cli
from . import transport as T
from .assembler import DEFAULT_DEADLINE_S, AssembledFrame, FrameAssembler
from .audio_sink import AudioSink, AVSync, open_player
from .codec import NeuralCodec
from .record import Recorder
from .signaling import KIND_DECODED, Picture, Signaling, resolve_server
from .sources import now_us
from .stats import CallStats, FrameLog, percentile

STARTED = time.monotonic()
# Packets waiting for the parse thread at most (~20 frames of slices): past it the newest are
# dropped, so a flood cannot grow memory or delay the call by more than that.
MAX_PARSE_BACKLOG = 128
# While the reference is broken, ask the sender for an I-frame at most this often: one request
# per ~RTT is enough, and an I-frame in flight must not be answered by another.
KEYFRAME_REQUEST_INTERVAL_S = 0.2


def jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Receiver:
    def __init__(self, codec: NeuralCodec, sig: Signaling, *, ice_addresses: list[str] | None = None,
                 stun: list[str] = (), recorder: Recorder | None = None, fps: float = 30.0,
                 frame_log: FrameLog | None = None, deadline_s: float = DEFAULT_DEADLINE_S,
                 quiet: bool = False, frame_size: int | None = None, audio: AudioSink | None = None) -> None:
        self.codec, self.sig = codec, sig
        # the other end's sound (counted, and recorded / played with --record / --play)
        self.audio = audio or AudioSink(recorder)
        self.ice, self.stun = ice_addresses, list(stun)
        self.recorder, self.fps, self.quiet = recorder, fps, quiet
        self.frame_log = frame_log or FrameLog(None)
        # the one latent shape this call's packets may have: anything else is refused unparsed
        self.frame_size = frame_size or codec.frame_size
        # learned P-frames decode wherever the shipped learned coder fits the model
        from .codec.conditional import shipped_for

        self.assembler = FrameAssembler(codec, deadline_s, latent_shape=codec.latent_shape(self.frame_size),
                                        learned=shipped_for(codec.model_id))
        self._foreign_said = 0
        self._shown_at_call = 0
        self.stats = CallStats("recv")
        self.pc = None
        self.sender_id: str | None = None
        self._slot: AssembledFrame | None = None  # newest frame waiting for the decoder
        self._wake = asyncio.Event()
        self._poll_handle: asyncio.TimerHandle | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")
        # one thread owns the assembler: packets are parsed in arrival order, off the event loop
        self._parse_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="parse")
        self._parsing = 0  # packets handed to the parse thread and not yet done
        self.overload = 0  # packets dropped because the parse thread was MAX_PARSE_BACKLOG behind
        self.exit_code = 0
        self.meta_channel: Any = None  # the sender's meta channel: keyframe requests go back on it
        self._last_keyframe_request = 0.0
        self.keyframe_requests = 0
        self.open = False  # a call's latent channel is open
        self._last_shown = -1
        self._last_publish = 0.0
        self._shown: OrderedDict[int, int] = OrderedDict()  # frame -> crc of complete shown frames
        self._meta: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._psnr: list[float] = []
        self._decode_ms: list[float] = []
        self.latencies: list[float] = []  # every shown frame, ms (the bench's percentiles)
        self.shown = 0
        self.verified = 0
        self.mismatched = 0  # complete frames we took for the sender's, whose CRC said otherwise
        self.known_broken = 0  # complete frames shown on a reference we knew broken (CRC differs)
        self.calls = 0

    # -- peer connection -------------------------------------------------------------------
    async def on_offer(self, sender_id: str, offer: dict[str, Any]) -> None:
        await self.close_call()
        pc = self.pc = T.create_peer_connection(self.stun)
        self.begin(sender_id)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "failed" and pc is self.pc:  # the sender will offer again
                await self.close_call()

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            self.attach(channel, channel.label == T.LATENT_LABEL)

        pc.on("track", self.take_track)

        try:
            answer = await T.accept_offer(pc, offer, self.ice)
        except Exception as e:  # noqa: BLE001 - a bad offer must not end the receiver
            print(f"receive: could not answer the sender's offer: {e}", file=sys.stderr)
            return
        await self.sig.signal(sender_id, answer)

    def begin(self, sender_id: str) -> None:
        """A new call from `sender_id` (on our peer connection or a two-way call's shared one,
        streamer.call): its first frame is an I-frame, so the assembler starts afresh."""
        self.sender_id = sender_id
        self.calls += 1
        self._shown_at_call = self.shown
        self._parse_pool.submit(self.assembler.reset)

    def take_track(self, track: Any) -> None:
        """The other end's media track: its sound goes to the sink (no video track is sent)."""
        if track.kind == "audio":
            self.audio.consume(track)

    def attach(self, channel: Any, latents: bool) -> None:
        """Take this direction's latent channel (`latents`) or its meta channel (the sender's
        CRCs come in on it, our recovery requests go back on it)."""
        if latents:
            channel.on("message", self.on_packet)
            self._announce_open(str(self.sender_id))
        else:
            self.meta_channel = channel
            channel.on("message", self.on_meta)

    def _announce_open(self, sender_id: str) -> None:
        self.open = True
        if not self.quiet:
            again = " again" if self.calls > 1 else ""
            print(f"receive: call open{again} with sender {sender_id}", flush=True)

    async def close_call(self) -> None:
        """Tear the peer connection down (bounded: aiortc's close can stall or raise)."""
        pc, self.pc, self.open = self.pc, None, False
        if pc is not None:
            await cli.bounded(pc.close())

    async def sender_left(self) -> None:
        if not self.quiet:
            print("receive: the sender left; waiting for it to come back", flush=True)
        await self.close_call()

    # -- packets -> frames -----------------------------------------------------------------
    def on_packet(self, data: bytes | str) -> None:
        if isinstance(data, str):
            self.assembler.n.bad_packets += 1
            return
        if self._parsing >= MAX_PARSE_BACKLOG:
            self.overload += 1
            return
        self._hand_to_parser(self.assembler.add, data)

    def _hand_to_parser(self, fn: Callable[..., list[AssembledFrame]], *args: Any) -> None:
        """Run an assembler call on the parse thread; its frames come back here in order."""
        self._parsing += 1
        fut = asyncio.get_running_loop().run_in_executor(self._parse_pool, self._assemble, fn, *args)
        fut.add_done_callback(self._assembled)

    def _assemble(self, fn: Callable[..., list[AssembledFrame]], *args: Any
                  ) -> tuple[list[AssembledFrame], float | None, int | None]:
        """(frames, next deadline, the frame our reference broke at if it needs recovery)."""
        frames = fn(*args)
        broken = self.assembler.broken_at if self.assembler.needs_keyframe else None
        return frames, self.assembler.next_deadline(), broken

    def _assembled(self, fut: "asyncio.Future[tuple[list[AssembledFrame], float | None, int | None]]") -> None:
        self._parsing -= 1
        if fut.cancelled() or fut.exception() is not None:
            return
        frames, deadline, broken_at = fut.result()
        for frame in frames:
            self.offer_frame(frame)
        if broken_at is not None and frames:
            self.request_keyframe(broken_at)
        if deadline is not None and self._poll_handle is None:
            self._poll_handle = asyncio.get_running_loop().call_later(
                max(0.0, deadline - time.monotonic()) + 0.001, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        self._hand_to_parser(self.assembler.poll)

    def request_keyframe(self, broken_at: int) -> None:
        """Ask the sender for recovery, an I-frame or an intra refresh (our reference stopped
        matching its at frame `broken_at`): what RTCP PLI does for RTP video. The sender
        answers once per break (a recovery it began after `broken_at` is already on its way);
        rate-limited here too. The assembler conceals until the recovery arrives."""
        now = time.monotonic()
        ch = self.meta_channel
        if ch is None or ch.readyState != "open" or now - self._last_keyframe_request < KEYFRAME_REQUEST_INTERVAL_S:
            return
        self._last_keyframe_request = now
        self.keyframe_requests += 1
        try:
            ch.send(json.dumps({"kf": broken_at}))
        except Exception:  # noqa: BLE001 - the channel closed under us: the next call starts with an I-frame
            pass

    def _mark_broken(self, frame_number: int) -> list[AssembledFrame]:
        self.assembler.mark_broken(frame_number)
        return []

    def offer_frame(self, frame: AssembledFrame) -> None:
        """Latest-only hand-over to the decoder: an undecoded older frame is skipped."""
        if self._slot is not None:
            self.stats.count("skipped")
        self._slot = frame
        self._wake.set()

    def on_meta(self, data: bytes | str) -> None:
        try:
            m = json.loads(data)
            n = int(m["f"])
        except (ValueError, TypeError, KeyError):
            return
        if isinstance(m.get("at0"), int):
            self.audio.sender_t0 = m["at0"]  # the sender's audio clock: sample 0 captured then
        entry = self._meta.setdefault(n, {})
        entry.update({k: v for k, v in m.items() if k in ("crc", "psnr")})
        while len(self._meta) > 512:
            self._meta.popitem(last=False)
        self._match(n)

    def _match(self, n: int) -> None:
        """Compare a shown complete frame's codes CRC with the sender's, once both are known."""
        meta, shown = self._meta.get(n), self._shown.get(n)
        if meta is None or shown is None or "crc" not in meta:
            return
        crc, believed_ok = shown
        if "ok" not in meta:
            meta["ok"] = meta["crc"] == crc
            self.frame_log.write({"f": n, "crc_ok": meta["ok"]})  # the verdict, once per shown complete frame
            if meta["ok"]:
                self.verified += 1
            elif not believed_ok:
                self.known_broken += 1  # shown while we knew our reference broken: recovery was asked for
            else:  # a divergence nothing else revealed
                self.mismatched += 1
                self._hand_to_parser(self._mark_broken, n)  # (the assembler lives in the parse thread)
                self.request_keyframe(n)  # our reference is not the sender's: recover from frame n on
        if meta["ok"] and "psnr" in meta and not meta.get("psnr_used"):
            meta["psnr_used"] = True  # the sender's local decode is ours, bit for bit
            self._psnr.append(float(meta["psnr"]))
            self.frame_log.write({"f": n, "psnr": float(meta["psnr"])})  # the PSNR of what we showed

    # -- decode and show -------------------------------------------------------------------
    async def decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            frame, self._slot = self._slot, None
            if frame is None:
                continue
            t0 = time.perf_counter()
            image = await loop.run_in_executor(self._pool, self._decode, frame)
            self._decode_ms.append((time.perf_counter() - t0) * 1000)
            self.show(frame, image)

    def _decode(self, frame: AssembledFrame) -> np.ndarray:
        return self.codec.decode_latents(frame.latents(self.codec))

    def show(self, frame: AssembledFrame, image: np.ndarray) -> None:
        shown_us = now_us()
        latency = (shown_us - frame.timestamp_us) / 1000
        self.shown += 1
        self.stats.count("frames")
        self.stats.add_latency(latency)
        self.latencies.append(latency)
        self.audio.video_latency(latency)
        if frame.complete:
            self._shown[frame.frame_number] = (frame.crc(), frame.reference_ok)
            while len(self._shown) > 512:
                self._shown.popitem(last=False)
            self._match(frame.frame_number)
        self.frame_log.write({"f": frame.frame_number, "cap": frame.timestamp_us, "shown": shown_us,
                              "lat": round(latency, 2), "complete": frame.complete,
                              "rows": frame.rows_received})
        if self.recorder is not None:  # at its shown time: the sound is written at its play time
            self.recorder.write(image, shown_us)
        if self.audio.av_sync is not None:
            self.audio.av_sync.video(shown_us, frame.timestamp_us, image)
        now = time.monotonic()
        if self._has_viewers() and now - self._last_publish >= 1.0 / self.fps:
            self._last_publish = now
            fut = asyncio.get_running_loop().run_in_executor(None, jpeg, image)
            n, ts = frame.frame_number, frame.timestamp_us

            def publish(f: "asyncio.Future[bytes]") -> None:
                if not f.cancelled() and f.exception() is None:
                    self.sig.offer_picture(KIND_DECODED, n, ts, f.result())
            fut.add_done_callback(publish)

    def _has_viewers(self) -> bool:
        return any(p.get("role") == "viewer" for p in self.sig.peers)

    # -- stats -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        n = self.assembler.n
        self.stats.totals["bytes"] = n.bytes
        for key in ("lost", "concealed", "bad_packets", "foreign", "late"):
            self.stats.totals[key] = getattr(n, key)
        self.stats.totals["verified"] = self.verified
        self.stats.totals["overload"] = self.overload
        self.stats.totals["keyframe_requests"] = self.keyframe_requests
        self.stats.totals["mismatched"] = self.mismatched
        self.stats.totals["known_broken"] = self.known_broken
        self.stats.totals["audio_frames"] = self.audio.frames
        self.stats.totals["audio_ms"] = round(self.audio.ms)
        if self.audio.audio_delay_ms is not None:  # capture -> play, and how much of it is alignment
            self.stats.values["audio_delay_ms"] = round(self.audio.audio_delay_ms, 1)
            self.stats.values["audio_aligned_ms"] = round(self.audio.delay_us / 1000, 1)
        self.stats.values["psnr"] = round(sum(self._psnr) / len(self._psnr), 2) if self._psnr else None
        self.stats.values["decode_ms"] = round(sum(self._decode_ms) / len(self._decode_ms), 1) if self._decode_ms else None
        self._psnr, self._decode_ms = [], []
        return self.stats.tick()

    def _say_foreign(self) -> None:
        """Once per call: the sender's packets do not fit this receiver (another model, or
        another --size), which would otherwise look like a call without pictures."""
        n = self.assembler.n
        if n.foreign and self._foreign_said < self.calls and self.shown == self._shown_at_call:
            self._foreign_said = self.calls
            print(f"receive: refusing the sender's packets: {n.last_error}", file=sys.stderr, flush=True)

    async def stats_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            snap = self.snapshot()
            if not self.quiet and (self.open or snap.get("fps")):  # no 0-fps lines between calls
                print(self.stats.line(snap), flush=True)
            self._say_foreign()
            await self.sig.send_stats(snap)

    # -- signaling -------------------------------------------------------------------------
    async def signaling_loop(self) -> None:
        async for msg in self.sig.messages():
            if isinstance(msg, Picture):
                continue
            t = msg.get("type")
            if t == "signal" and isinstance(msg.get("data"), dict):
                data = msg["data"]
                if data.get("type") == "offer" and "sdp" in data:
                    await self.on_offer(str(msg.get("from")), data)
                elif data.get("type") == "bye" and msg.get("from") == self.sender_id and self.pc is not None:
                    await self.sender_left()
            elif t == "peer_left" and msg.get("peer_id") == self.sender_id and self.pc is not None:
                await self.sender_left()
            elif t == "error" and not self.quiet:
                print(f"receive: server says: {msg.get('message')} ({msg.get('code')})", file=sys.stderr)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.ensure_future(c) for c in (self.signaling_loop(), self.decode_loop(), self.stats_loop())]
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([tasks[0], stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            # the signaling socket first: a loop that swallowed its cancellation (inside aiortc's
            # close) then finds its message stream ended instead of waiting on it for ever
            await cli.bounded(self.sig.close())
            await cli.finish_tasks(tasks)
            await self.close_call()
            self.release()

    def release(self) -> None:
        """The threads and the assembler's timer, at the end (after the loops)."""
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        self._parse_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.audio.close()

    def summary(self) -> dict[str, Any]:
        n = self.assembler.n
        lat = self.latencies
        return {"role": "receiver", "shown": self.shown, "complete": n.complete, "concealed": n.concealed,
                "overload": self.overload, "keyframe_requests": self.keyframe_requests,
                "lost": n.lost, "bad_packets": n.bad_packets, "foreign": n.foreign, "late": n.late,
                "learned": n.learned, "learned_undecodable": n.learned_undecodable,
                "learned_mismatched": n.learned_mismatched,
                "skipped": int(self.stats.totals.get("skipped", 0)), "verified": self.verified,
                "mismatched": self.mismatched, "known_broken": self.known_broken, "bytes": n.bytes, "calls": self.calls,
                "latency_ms": {q: round(percentile(lat, int(q[1:])) or 0, 1) for q in ("p50", "p95", "p99")},
                "audio_frames": self.audio.frames, "audio_ms": round(self.audio.ms),
                "audio_delay_ms": self.audio.audio_delay_ms and round(self.audio.audio_delay_ms, 1),
                "audio_aligned_ms": round(self.audio.delay_us / 1000, 1),
                **({"av_sync": self.audio.av_sync.summary()} if self.audio.av_sync is not None else {}),
                "cpu_s": round(time.process_time(), 2), "wall_s": round(time.monotonic() - STARTED, 2),
                "history": list(self.stats.history)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamer.receive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(ap)
    ap.add_argument("--size", type=int, default=0,
                    help="the call's frame side, as the sender's --size (default: the model's own); "
                    "packets of any other shape are refused unparsed")
    ap.add_argument("--record", metavar="PATH", help="record the shown pictures (H.264 or MPEG-4, by PyAV) "
                    "and the sound (AAC) into one file")
    add_audio_args(ap)
    ap.add_argument("--fps", type=float, default=30.0, help="most pictures per second published to viewers")
    ap.add_argument("--deadline-ms", type=float, default=DEFAULT_DEADLINE_S * 1000,
                    help="show a frame with missing slices (concealed) when none came for this long; the least: "
                         "it grows with the gaps seen between slices (up to 1 s)")
    ap.add_argument("--frame-log", metavar="PATH",
                    help="JSON lines for the bench: one per shown frame (it has 'shown'), and per shown "
                    "complete frame its CRC verdict ('crc_ok') and, if bit-exact and measured, the sender's "
                    "PSNR ('psnr'), each when known")
    return ap.parse_args(argv)


def add_audio_args(ap: argparse.ArgumentParser) -> None:
    """The receiving end's sound options (streamer.receive and streamer.call)."""
    ap.add_argument("--play", action="store_true", help="play the other end's sound on this machine's output "
                    "device (default: only counted, and recorded with --record)")
    ap.add_argument("--measure-av", action="store_true", help="measure lip-sync from a sender with --audio tone "
                    "--source sample:flash (or synthetic:flash): each beep as played vs its flash as shown "
                    "(summary's av_sync)")
    ap.add_argument("--audio-delay-ms", default="auto", metavar="MS|auto",
                    help="play and record the sound this much later; auto (default): later by as much as it "
                    "would come before its pictures (the pictures' delay against the sender's audio clock)")


def open_sink(prog: str, args: argparse.Namespace, recorder: Recorder | None) -> AudioSink:
    """The sink of the other end's sound, per the options (--play without a device: one line)."""
    player = open_player(prog, args.quiet) if args.play else None
    return AudioSink(recorder, player, AVSync() if args.measure_av else None, args.audio_delay_ms)


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before loading a model or connecting (ConfigError, exit 2)."""
    cli.check_common_args(args)
    if args.audio_delay_ms != "auto":
        given = args.audio_delay_ms
        try:
            args.audio_delay_ms = float(given)
        except ValueError:
            args.audio_delay_ms = float("nan")  # (fails the check below)
        cli.require(0 <= args.audio_delay_ms <= 2000,
                    f"--audio-delay-ms must be auto or a number of ms in 0..2000, got {given}")
    cli.require(args.fps > 0, f"--fps must be positive, got {args.fps:g}")
    cli.require(args.deadline_ms > 0, f"--deadline-ms must be positive, got {args.deadline_ms:g}")
    if args.record:
        cli.check_writable(args.record, "--record")


async def amain(args: argparse.Namespace, stop: asyncio.Event | None = None,
                on_start: Callable[[Receiver], None] | None = None) -> Receiver:
    """Run a receiver until `stop`, --seconds, or the server closes; returns it (counters).
    `on_start` gets the Receiver once it exists (tests reach in through it)."""
    stop = stop or asyncio.Event()
    check_args(args)
    server, room, token = resolve_server(args.server, args.room, args.token, args.url)
    # the event loop shares the GIL with the codec thread: hand it over within 1 ms, not 5
    sys.setswitchinterval(0.001)
    ice = list(T.check_ice_addresses(args.ice_address)) if args.ice_address else None
    T.tune_sctp(args.sctp_rto_min)
    codec = cli.load_codec(args.weights, args.backend, args.threads, args.backend_precision,
                           args.backend_cache)
    size = cli.check_frame_size(codec, args.size)
    sig = Signaling(server, room, token, "receiver", name="streamer.receive")
    await sig.connect()
    try:
        recorder = open_recorder("receive", args.record, args.fps)
    except BaseException:
        await sig.close()
        raise
    rx = Receiver(codec, sig, ice_addresses=ice, stun=args.stun, recorder=recorder, fps=args.fps,
                  frame_log=FrameLog(args.frame_log), deadline_s=args.deadline_ms / 1000, quiet=args.quiet,
                  frame_size=size, audio=open_sink("receive", args, recorder))
    if not args.quiet:
        print(f"receive: joined room {room!r} at {server} as {sig.peer_id}; waiting for a sender", flush=True)
    if on_start is not None:
        on_start(rx)
    if args.seconds:
        asyncio.get_running_loop().call_later(args.seconds, stop.set)
    try:
        await rx.run(stop)
    finally:
        await cli.bounded(sig.close())
        if not await close_recorder("receive", recorder, args.record, args.quiet):
            rx.exit_code = 1
        rx.frame_log.close()
    cli.report_end("receive", sig, stop, args.summary, rx.summary)
    return rx


def open_recorder(prog: str, path: str | None, fps: float) -> Recorder | None:
    """--record PATH's recorder (None without it); a failure later is said at once, from the
    writer thread, and the call goes on."""
    if not path:
        return None
    loop = asyncio.get_running_loop()

    def recording_failed(message: str) -> None:
        loop.call_soon_threadsafe(print, f"{prog}: {message}; the call goes on unrecorded", file=sys.stderr)
    return Recorder(path, fps, on_error=recording_failed, audio=True)


async def close_recorder(prog: str, recorder: Recorder | None, path: str | None, quiet: bool) -> bool:
    """Finish the recording and say how it went; False when it failed (exit code 1)."""
    if recorder is None:
        return True
    await asyncio.get_running_loop().run_in_executor(None, recorder.close)
    if recorder.error:
        print(f"{prog}: {recorder.error} (recorded {recorder.written} frames before it failed)",
              file=sys.stderr, flush=True)
        return False
    if not quiet:
        print(f"{prog}: recorded {recorder.written} frames and {recorder.audio_written / 48000:.1f} s of sound "
              f"to {path} ({recorder.codec_name})", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_program("receive", lambda stop: amain(args, stop))


if __name__ == "__main__":
    cli.exit_now(main())
