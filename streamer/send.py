"""`python -m streamer.send`: the sending end of a call.

Captures frames (webcam, a file, the bundled sample clip, a synthetic pattern, or a browser
viewer's camera), encodes the newest one when the data channel has drained, and sends its
quantized latents to the receiver over WebRTC. Per frame a small side message on a second
channel ("meta") carries the CRC32 of the codes (the receiver proves its latents bit-exact) and,
with --measure, the PSNR of the sender's own decode of the same codes (which is what the
receiver shows for a complete frame). Prints one stats line a second.

    python -m streamer.send --url 'http://127.0.0.1:8765/?room=demo&token=...&role=sender' --source sample \\
        --ice-address 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from server.protocol import bitrate_error

from . import cli
from . import transport as T
from .audio import AudioSource, check_audio_spec, is_page_microphone, open_audio
from .codec import NeuralCodec
from .errors import ConfigError
from .metrics import psnr
from .receive import jpeg
from .ratecontrol import RateController
from .session import DEFAULT_KEYFRAME_INTERVAL, DEFAULT_RECOVERY, RECOVERIES, Candidate, EncoderSession, FrameType
from .signaling import KIND_AUDIO, KIND_CAMERA, KIND_ORIGINAL, Picture, Signaling, resolve_server
from .sources import BrowserSource, CapturedFrame, FrameSource, open_source
from .stats import CallStats

if TYPE_CHECKING:
    from .codec.conditional import ConditionalCoder

STARTED = time.monotonic()
DEFAULT_KBPS = 300.0  # a video call's rate (x264 and VP8 reach ~38 dB there on val)


P_FRAMES = ("tables", "learned")


def learned_coder(codec: NeuralCodec):
    """The shipped learned P-frame coder for this model (`--p-frames learned`); ConfigError,
    one line, when there is none for it."""
    from .codec.conditional import shipped_for

    coder = shipped_for(codec.model_id)
    if coder is None:
        raise ConfigError(f"--p-frames learned: no learned coder ships for model {codec.model_id:08x} "
                          "(streamer/weights/conditional/ is for the default model)")
    return coder


class Sender:
    def __init__(self, codec: NeuralCodec, source: FrameSource, sig: Signaling, cfg: T.TransportConfig, *,
                 ice_addresses: list[str] | None = None, stun: list[str] = (), measure: bool = False,
                 share_original: bool = False, loss: float = 0.0, loss_seconds: float = 0.0,
                 quiet: bool = False, level: int | None = None, keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL,
                 inter: bool = True, kbps: float | None = None, recovery: str = DEFAULT_RECOVERY,
                 audio: AudioSource | None = None, learned: "ConditionalCoder | None" = None) -> None:
        """learned: the learned P-frame coder (`learned_coder`, --p-frames learned); None: the
        table-based P-frames."""
        self.codec, self.source, self.sig, self.cfg = codec, source, sig, cfg
        self.audio = audio  # our sound: one audio track per call, on the same peer connection
        self.audio_track: Any = None
        self.pcm_chunks = 0  # microphone chunks (kind 4) from the camera link's page, pushed into
        self.pcm_bad = 0  # our sound when it is the page's (--source browser, --audio auto)
        # step-mode models: the quantizer level (step size) frames are sent at; a rate
        # controller would change it per frame (the level travels in every packet)
        self.level = codec.quantizer.check_level(level)
        # the call's reference frame and the I/P decision (one per call: reset on a new one)
        self.session = EncoderSession(codec, max_packet_bytes=cfg.max_packet_bytes, level=self.level,
                                      keyframe_interval=keyframe_interval, inter=inter, recovery=recovery,
                                      learned=learned)
        # --kbps: the level of each frame from the bits the frames really made (None: --level);
        # learned P-frames have the finest levels only
        levels = codec.levels if learned is None else min(codec.levels, learned.levels)
        self.rate = (RateController(kbps, source.fps, levels, start_level=levels - 2)
                     if kbps and codec.levels > 1 else None)
        self._peer_totals: dict[str, float] = {}
        self.ice, self.stun = ice_addresses, list(stun)
        self.measure, self.share_original, self.quiet = measure, share_original, quiet
        self.loss, self.loss_seconds = loss, loss_seconds
        self.stats = CallStats("send")
        self.pc = None
        self.receiver_id: str | None = None
        self.channel: T.ChannelSender | None = None
        self.meta = None
        self.injector: T.LossInjector | None = None
        self.frame_number = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._measure_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="measure")
        self._measuring = False
        self._last_original = 0.0
        self._encode_ms: list[float] = []
        self._psnr: list[float] = []
        self.peer_stats: dict[str, Any] = {}
        self.open_time: float | None = None
        self.loss_end_us: int | None = None

    # -- peer connection -------------------------------------------------------------------
    async def start_call(self, receiver_id: str) -> None:
        await self.close_call()
        self.receiver_id = receiver_id
        pc = self.pc = T.create_peer_connection(self.stun)
        self.add_audio(pc)
        self.attach(pc, *T.create_channels(pc, self.cfg), receiver_id)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "failed" and pc is self.pc:
                print("send: the peer connection failed; offering again", file=sys.stderr)
                await asyncio.sleep(1.0)
                if pc is self.pc and self.sig.peer_with_role("receiver") == receiver_id:
                    await self.start_call(receiver_id)

        offer = await T.make_offer(pc, self.ice)
        await self.sig.signal(receiver_id, offer)

    def add_audio(self, pc: Any) -> list[Any]:
        """Our sound's track on `pc`, before its offer or answer (the list given to accept_offer)."""
        if self.audio is None:
            return []
        track = self.audio_track = self.audio.track()
        pc.addTrack(track)
        return [track]

    def attach(self, pc: Any, latents: Any, meta: Any, receiver_id: str) -> None:
        """Send this direction's frames on `latents` and its side messages on `meta`, channels of
        `pc` (ours, or a two-way call's shared one: streamer.call); the capture loop starts
        sending once `latents` is open (at once if it already is)."""
        self.channel, self.meta = T.ChannelSender(latents, self.cfg.buffer_threshold), meta
        self.session.reset()  # the receiver has no reference yet: the first frame is an I-frame
        meta.on("message", self.on_meta)

        def on_open() -> None:
            self.open_time = time.monotonic()
            if self.loss > 0:
                self.injector = T.LossInjector(pc, self.loss)
                if self.loss_seconds > 0:
                    asyncio.get_running_loop().call_later(self.loss_seconds, self._end_loss)
            if not self.quiet:
                print(f"send: call open with receiver {receiver_id} ({self.cfg.mode})", flush=True)
        if latents.readyState == "open":  # an answerer's channel arrives open
            on_open()
        else:
            latents.on("open", on_open)

    def detach(self) -> None:
        """Stop sending (the shared peer connection is closed by its owner)."""
        self.channel, self.meta = None, None

    def _end_loss(self) -> None:
        if self.injector is not None:
            self.injector.p = 0.0
            self.loss_end_us = time.time_ns() // 1000
            if not self.quiet:
                print("send: simulated loss ended", flush=True)

    async def close_call(self) -> None:
        """Tear the peer connection down (bounded: aiortc's close can stall or raise)."""
        pc, self.pc, self.channel, self.meta = self.pc, None, None, None
        if pc is not None:
            await cli.bounded(pc.close())

    def on_meta(self, data: bytes | str) -> None:
        """The receiver's side messages: {"kf": N} asks for recovery, an I-frame or an intra
        refresh (its reference broke at frame N: lost or concealed rows, or a failed CRC)."""
        try:
            m = json.loads(data)
        except (ValueError, TypeError):
            return
        if isinstance(m, dict) and "kf" in m:
            broken_at = m["kf"]
            if not isinstance(broken_at, int) or isinstance(broken_at, bool):
                return
            self.stats.count("keyframe_requests")
            if not self.session.request_keyframe(broken_at):
                self.stats.count("recovery_requests_answered_already")  # a recovery is on its way

    # -- frames ----------------------------------------------------------------------------
    def _encode(self, cap: CapturedFrame, number: int, level: int | None) -> Candidate:
        return self.session.encode(cap.image, number, cap.timestamp_us, level)

    def _next_level(self) -> int | None:
        if self.rate is None:
            return None
        return self.rate.level_for_next_frame(int(self.session.next_frame_type()))

    def _feedback(self, rx: dict[str, Any]) -> None:
        """The receiver's stats (once a second) -> the rate controller: frames lost since the
        last report and the capture-to-display delay (an aiortc data channel has no
        delay-based congestion control of its own), and what waits in our send buffer."""
        if self.rate is None:
            return
        lost, frames = float(rx.get("lost", 0) or 0), float(rx.get("frames", 0) or 0)
        d_lost = max(0.0, lost - self._peer_totals.get("lost", lost))
        d_frames = max(0.0, frames - self._peer_totals.get("frames", frames))
        self._peer_totals = {"lost": lost, "frames": frames}
        lat = rx.get("latency_ms")
        delay = float(lat["p50"]) if isinstance(lat, dict) and isinstance(lat.get("p50"), (int, float)) else None
        ch = self.channel
        self.rate.channel_feedback(d_lost / (d_lost + d_frames) if d_lost + d_frames > 0 else 0.0, delay,
                                   ch.channel.bufferedAmount if ch is not None else None)

    async def capture_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            cap = await self.source.frame()
            ch = self.channel
            if ch is None or ch.channel.readyState != "open":
                continue  # no call yet: nothing to drop, nobody is waiting
            if not ch.ready:  # the previous frame has not left yet: drop this one, never queue
                self.stats.count("dropped")
                continue
            if self.rate is not None and self.rate.should_skip_frame():
                self.rate.frame_dropped(cap.timestamp_us / 1e6)  # the buffer drains meanwhile
                self.stats.count("rate_skipped")  # even the coarsest level is over the budget
                continue
            number = self.frame_number
            cand = await loop.run_in_executor(self._pool, self._encode, cap, number, self._next_level())
            self._encode_ms.append(cand.encode_ms)
            if ch is not self.channel or not ch.send_frame(cand.packets):
                self.stats.count("dropped")  # never sent: the reference stays the previous frame
                continue
            self.session.commit(cand)
            q = cand.q
            nbytes = sum(len(p) for p in cand.packets)
            if self.rate is not None:
                self.rate.frame_sent(nbytes, q.level, int(cand.frame_type), t=cap.timestamp_us / 1e6)
            self.frame_number += 1
            self.stats.count("frames")
            self.stats.count("i_frames" if cand.frame_type == FrameType.INTRA else "p_frames")
            if cand.refresh_rows is not None:
                self.stats.count("refresh_frames")  # P-frames that sent a band intra
            self.stats.count("bytes", nbytes)
            meta: dict[str, Any] = {"f": number, "crc": cand.crc}
            if number % 10 == 0 and self.audio_track is not None and self.audio_track.epoch0 is not None:
                meta["at0"] = self.audio_track.epoch0  # our sound's capture clock: the receiver aligns to it
            self._send_meta(meta)
            if self.measure and not self._measuring:  # latest-only: skip while one is running
                self._measuring = True
                fut = loop.run_in_executor(self._measure_pool, self._local_psnr, cap.image, q)
                fut.add_done_callback(lambda f, n=number: self._measured(n, f))
            self._share(cap, number)

    def _local_psnr(self, image: np.ndarray, q: Any) -> float:
        return psnr(image, self.codec.decode(q))

    def _measured(self, number: int, fut: "asyncio.Future[float]") -> None:
        self._measuring = False
        if fut.cancelled() or fut.exception() is not None:
            return
        self._psnr.append(fut.result())
        self._send_meta({"f": number, "psnr": round(fut.result(), 3)})

    def _send_meta(self, m: dict[str, Any]) -> None:
        meta = self.meta
        if meta is not None and meta.readyState == "open":
            with contextlib.suppress(Exception):
                meta.send(json.dumps(m, separators=(",", ":")))

    def _share(self, cap: CapturedFrame, number: int) -> None:
        now = time.monotonic()
        if not self.share_original or now - self._last_original < 1.0 / self.source.fps:
            return
        if not any(p.get("role") == "viewer" for p in self.sig.peers):
            return
        self._last_original = now
        fut = asyncio.get_running_loop().run_in_executor(None, jpeg, cap.image)

        def done(f: "asyncio.Future[bytes]") -> None:
            if not f.cancelled() and f.exception() is None:
                self.sig.offer_picture(KIND_ORIGINAL, number, cap.timestamp_us, f.result())
        fut.add_done_callback(done)

    # -- stats -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        self.stats.totals["dropped"] = self.stats.totals.get("dropped", 0)
        self.stats.totals["capture_dropped"] = self.source.dropped
        self.stats.values["encode_ms"] = round(sum(self._encode_ms) / len(self._encode_ms), 1) if self._encode_ms else None
        self.stats.values["psnr"] = round(sum(self._psnr) / len(self._psnr), 2) if self._psnr else None
        if self.injector is not None:
            self.stats.values["loss_dropped"] = self.injector.dropped
        if self.rate is not None:
            self.stats.values["target_kbps"] = round(self.rate.effective_target_kbps, 1)
            self.stats.values["level"] = round(self.rate.level, 2)
        self._encode_ms, self._psnr = [], []
        snap = self.stats.tick()
        # for the camera link's page: whether our sound is its microphone (then it sends it)
        return {**snap, "source": self.source.name, "audio": self.audio.name if self.audio is not None else None,
                "pcm_chunks": self.pcm_chunks}

    async def stats_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            snap = self.snapshot()
            if not self.quiet:
                line = self.stats.line(snap)
                rx = self.peer_stats
                if rx and "latency_ms" in rx:
                    line += f" || recv {rx.get('fps', 0):.1f} fps lat {rx['latency_ms']['p50']:.0f} ms"
                print(line, flush=True)
            await self.sig.send_stats(snap)

    # -- signaling -------------------------------------------------------------------------
    async def signaling_loop(self) -> None:
        if (rid := self.sig.peer_with_role("receiver")) is not None:
            await self.start_call(rid)
        elif not self.quiet:
            print("send: waiting for a receiver to join", flush=True)
        async for msg in self.sig.messages():
            if isinstance(msg, Picture):
                if msg.kind == KIND_CAMERA and isinstance(self.source, BrowserSource):
                    self.source.push_jpeg(msg.jpeg, msg.timestamp_us)
                elif msg.kind == KIND_AUDIO:
                    self.on_pcm(msg.jpeg)
                continue
            t = msg.get("type")
            if t == "peer_joined" and msg.get("role") == "receiver":
                await self.start_call(str(msg.get("peer_id")))
            elif t == "peer_left" and msg.get("peer_id") == self.receiver_id:
                await self.close_call()
            elif t == "signal" and msg.get("from") == self.receiver_id and self.pc is not None:
                data = msg.get("data")
                if isinstance(data, dict) and data.get("type") == "answer" and "sdp" in data:
                    try:
                        await T.accept_answer(self.pc, data, self.ice)
                    except Exception as e:  # noqa: BLE001 - a bad answer: wait for the next call
                        print(f"send: bad answer from the receiver: {e}", file=sys.stderr)
            elif t == "stats" and msg.get("from_role") == "receiver":
                self.peer_stats = msg.get("stats") or {}
                if isinstance(self.peer_stats, dict):
                    self._feedback(self.peer_stats)
            elif t == "set_bitrate":
                await self.sig.send_json(self._set_bitrate(msg))
            elif t == "camera" and not self.quiet:
                on = msg.get("on")
                note = "" if isinstance(self.source, BrowserSource) else " (ignored: not --source browser)"
                print(f"send: a viewer turned its camera {'on' if on else 'off'}{note}", flush=True)
            elif t == "error" and not self.quiet:
                print(f"send: server says: {msg.get('message')} ({msg.get('code')})", file=sys.stderr)

    def on_pcm(self, payload: bytes) -> None:
        """The camera link's microphone: our sound if it is the page's, else ignored."""
        if not (is_page_microphone(self.audio) and isinstance(self.source, BrowserSource)):
            return
        try:
            self.audio.push_pcm(payload)
            self.pcm_chunks += 1
        except ValueError:
            self.pcm_bad += 1  # (the server checked it already: only a bug gets here)

    def _set_bitrate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A page holding the camera link, or the receiver, asks for another --kbps target: set
        it, and answer the asker either way (docs/protocol.md)."""
        answer = bitrate_answer(self.rate, msg.get("kbps"))
        if answer["ok"] and not self.quiet:
            print(f"send: bitrate target now {answer['target_kbps']:g} kbps (asked by "
                  f"{str(msg.get('from'))[:16]})", flush=True)
        return {"type": "bitrate", "to": str(msg.get("from", "")), **answer}

    async def run(self, stop: asyncio.Event) -> None:
        self.source.start()
        tasks = [asyncio.ensure_future(c) for c in (self.signaling_loop(), self.capture_loop(), self.stats_loop())]
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait([tasks[0], tasks[1], stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # e.g. SourceError from the capture thread
        finally:
            stopper.cancel()
            if self.receiver_id and self.pc is not None:
                await cli.bounded(self.sig.signal(self.receiver_id, {"type": "bye"}))
            # the signaling socket first: a loop that swallowed its cancellation (inside aiortc's
            # close) then finds its message stream ended instead of waiting on it for ever
            await cli.bounded(self.sig.close())
            await cli.finish_tasks(tasks)
            await self.close_call()
            self.release()

    def release(self) -> None:
        """The source and the threads, at the end (after the loops)."""
        self.source.close()
        if self.audio is not None:
            self.audio.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._measure_pool.shutdown(wait=False, cancel_futures=True)

    def summary(self) -> dict[str, Any]:
        return {"role": "sender", "sent": self.frame_number, "dropped": int(self.stats.totals.get("dropped", 0)),
                "i_frames": self.session.frames[FrameType.INTRA], "p_frames": self.session.frames[FrameType.INTER],
                "keyframe_requests": self.session.keyframe_requests, "recovery": self.session.recovery,
                "refresh_frames": self.stats.totals.get("refresh_frames", 0),
                "target_kbps": self.rate.target_kbps if self.rate is not None else None,
                "captured": self.source.captured, "capture_dropped": self.source.dropped,
                "audio": self.audio.name if self.audio is not None else None,
                "loss_dropped": self.injector.dropped if self.injector else 0, "loss_end_us": self.loss_end_us,
                "model": f"{self.codec.name} {self.codec.model_id:08x}", "transport": self.cfg.mode,
                "cpu_s": round(time.process_time(), 2), "wall_s": round(time.monotonic() - STARTED, 2),
                "history": list(self.stats.history)}


def bitrate_answer(rate: RateController | None, kbps: object) -> dict[str, Any]:
    """Set a live bitrate target asked for over the server; what to answer (ok, target_kbps,
    message). The server checked `kbps` already; a sender checks again, never trusting it."""
    if rate is None:
        return {"ok": False, "target_kbps": None, "message": "this sender has no rate control: "
                "it codes every frame at a fixed --level (start it with --kbps N instead)"}
    if (problem := bitrate_error(kbps)) is not None:
        return {"ok": False, "target_kbps": round(rate.target_kbps, 1), "message": problem}
    rate.set_target(float(kbps))  # type: ignore[arg-type]  # a number: bitrate_error said so
    return {"ok": True, "target_kbps": round(rate.target_kbps, 1),
            "message": f"the sender now aims at {rate.target_kbps:g} kbps"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamer.send", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(ap)
    ap.add_argument("--source", default="auto",
                    help="auto (webcam, else the sample clip) | sample | synthetic | webcam[:DEVICE] | browser | PATH")
    ap.add_argument("--fps", type=float, default=30.0, help="capture rate (default 30)")
    add_audio_arg(ap)
    ap.add_argument("--size", type=int, default=0, help="model input side (default: the model's own)")
    ap.add_argument("--kbps", type=float, default=None,
                    help=f"bitrate to hold (default {DEFAULT_KBPS:g}; 0: every frame at --level): the quantizer "
                    "level of each frame follows the bits the frames really made and the receiver's reports")
    ap.add_argument("--level", type=int, default=None,
                    help="a fixed quantizer level (0 = finest step, most bits) instead of --kbps; default: the model's")
    ap.add_argument("--keyframe-interval", type=int, default=DEFAULT_KEYFRAME_INTERVAL, metavar="FRAMES",
                    help=f"an I-frame at least every this many frames (default {DEFAULT_KEYFRAME_INTERVAL}; "
                    "0: only when the receiver asks)")
    ap.add_argument("--recovery", choices=RECOVERIES, default=DEFAULT_RECOVERY,
                    help="how a receiver's broken reference (and the periodic refresh) is answered: an "
                    f"I-frame (keyframe) or intra refresh, a band of rows a frame (default {DEFAULT_RECOVERY})")
    ap.add_argument("--p-frames", choices=P_FRAMES, default="tables",
                    help="how P-frames are coded: tables (residuals against the reference's codes, the "
                    "default) or learned (the shipped learned conditional coder; recovery by I-frames)")
    ap.add_argument("--intra-only", action="store_true",
                    help="code every frame alone (no P-frames: ~3x the rate, for comparison)")
    ap.add_argument("--transport", choices=T.TRANSPORTS, default=T.DEFAULT_TRANSPORT,
                    help="slices: one-chunk slices, no retransmission (default); lifetime: whole frames "
                    "with a packet lifetime")
    ap.add_argument("--lifetime-ms", type=int, default=T.DEFAULT_LIFETIME_MS, help="packet lifetime (lifetime transport)")
    ap.add_argument("--measure", action="store_true",
                    help="decode our own codes and send the PSNR per frame (costs a decode per measured frame)")
    ap.add_argument("--share-original", action="store_true", help="show viewers the original picture too (kind 2)")
    ap.add_argument("--simulate-loss", type=float, default=0.0, metavar="P",
                    help="testing: drop outgoing SCTP packets with probability P")
    ap.add_argument("--loss-seconds", type=float, default=0.0,
                    help="testing: end the simulated loss this long after the call opens (0: never)")
    return ap.parse_args(argv)


def add_audio_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--audio", default="auto", metavar="SPEC",
                    help="our sound: auto (the video source's own, else the microphone, else silence) | "
                    "mic[:DEVICE] | sample | tone (a beep each second, for measuring) | none | PATH")


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before loading a model or connecting (ConfigError, exit 2)."""
    cli.check_common_args(args)
    check_audio_spec(args.audio)
    cli.require(0 < args.fps <= 240, f"--fps must be in (0, 240], got {args.fps:g}")
    cli.require(0 <= args.simulate_loss < 1, f"--simulate-loss must be in [0, 1), got {args.simulate_loss:g}")
    cli.require(args.loss_seconds >= 0, f"--loss-seconds must be 0 or more, got {args.loss_seconds:g}")
    cli.require(args.lifetime_ms >= 1, f"--lifetime-ms must be at least 1, got {args.lifetime_ms}")
    if args.kbps is None:
        args.kbps = 0.0 if args.level is not None else DEFAULT_KBPS
    cli.require(0 <= args.kbps <= 100_000, f"--kbps must be in 0..100000, got {args.kbps:g}")
    cli.require(args.keyframe_interval >= 0, f"--keyframe-interval must be 0 or more, got {args.keyframe_interval}")


async def amain(args: argparse.Namespace, stop: asyncio.Event | None = None,
                on_start: Callable[[Sender], None] | None = None) -> Sender:
    """Run a sender until `stop`, --seconds, or the server closes; returns it (counters).
    `on_start` gets the Sender once it exists (tests reach in through it)."""
    stop = stop or asyncio.Event()
    check_args(args)
    server, room, token = resolve_server(args.server, args.room, args.token, args.url)
    # the event loop shares the GIL with the codec thread: hand it over within 1 ms, not 5
    sys.setswitchinterval(0.001)
    ice = list(T.check_ice_addresses(args.ice_address)) if args.ice_address else None
    cfg = T.TransportConfig(args.transport, args.lifetime_ms)
    T.tune_sctp(args.sctp_rto_min)
    codec = cli.load_codec(args.weights, args.backend, args.threads, args.backend_precision,
                           args.backend_cache)
    codec.quantizer.check_level(args.level)  # a bad --level: say so before joining the room
    # none for this model: say so before joining the room
    learned = learned_coder(codec) if args.p_frames == "learned" else None
    size = cli.check_frame_size(codec, args.size)
    source = open_source(args.source, size, args.fps, quiet=args.quiet)
    try:
        audio = open_audio(args.audio, source, quiet=args.quiet)
    except BaseException:
        source.close()
        raise
    sig = Signaling(server, room, token, "sender", name="streamer.send")
    try:
        await sig.connect()
    except BaseException:
        source.close()
        audio.close()
        raise
    if not args.quiet:
        print(f"send: joined room {room!r} at {server}; source {source.name} at {size}x{size} "
              f"{args.fps:g} fps, sound {audio.name}; model {codec.name} ({codec.model_id:08x})", flush=True)
    tx = Sender(codec, source, sig, cfg, ice_addresses=ice, stun=args.stun, measure=args.measure,
                share_original=args.share_original, loss=args.simulate_loss, loss_seconds=args.loss_seconds,
                quiet=args.quiet, level=args.level, keyframe_interval=args.keyframe_interval,
                inter=not args.intra_only, kbps=args.kbps or None, recovery=args.recovery, audio=audio,
                learned=learned)
    if on_start is not None:
        on_start(tx)
    if args.seconds:
        asyncio.get_running_loop().call_later(args.seconds, stop.set)
    try:
        await tx.run(stop)
    finally:
        await cli.bounded(sig.close())
    cli.report_end("send", sig, stop, args.summary, tx.summary)
    return tx


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_program("send", lambda stop: amain(args, stop))


if __name__ == "__main__":
    cli.exit_now(main())
