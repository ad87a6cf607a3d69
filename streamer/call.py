"""`python -m streamer.call` (`neural-call join URL`): one program per person of a two-way call.

Sends this machine's camera (or a file, the sample clip, a synthetic pattern) to the other
caller and shows the other caller's picture, both directions over ONE RTCPeerConnection. Each
direction is the one-way call's half, unchanged: a `streamer.send.Sender` (its EncoderSession,
its RateController, its capture loop) sends ours; a `streamer.receive.Receiver` (its assembler,
its decoder) takes theirs. Only the peer connection and the signaling socket are shared.

    python -m server --room call                     # prints the room's links; give the caller:
    python -m streamer.call --url '<the caller: link>' --source webcam    # (one link, two people)

Who offers: the caller that was in the room first (it learns the other from `peer_joined`;
the second learns the first from `joined.peers` and waits for its offer): one offerer, no glare.
The offerer opens four data channels, labelled by whose frames they carry: `latents/offerer`,
`meta/offerer` (the offerer's frames and their CRCs; the answerer's recovery requests go back
on `meta/offerer`), `latents/answerer`, `meta/answerer` (the other way). So each side's
keyframe/refresh requests reach the session that sends the frames they are about.

Hang-up: Ctrl-C (or --seconds) says `bye` and leaves; the other caller's call ends and it
exits (with --stay it waits for the next caller). A caller whose connection was lost without a
`bye` is waited for: when it rejoins, the one still in the room offers again.

Stats (once a second, to the server and printed): the receive direction's numbers at the top
level (what the other caller's rate controller reads: frames, lost, latency_ms) and this
caller's sending numbers under "send".

The page: after joining, the program prints its own page link (`page:`, role=face, with a token
only this program got from the server). That page shows the other person large and this one
small, and steers this program only: hang up (`hangup`: we say bye and end, so the other's call
ends too), mute camera (`mute`: our source's frames are discarded, so no new frames are sent:
the other side's picture stops at the last one and its page says "camera off"), mute microphone
(`Call.mic_muted`, which the audio sender reads), and the bitrate target of our sender. With
`--source browser` the page's camera (kind 3) and microphone (kind 4: 20 ms of 48 kHz mono
int16 PCM) come to this program only: the frames enter our sender, the PCM goes to
`Call.pushed_audio.push(samples, sample_rate)` (a streamer.audio.PushedAudioSource).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

from . import cli
from . import transport as T
from .assembler import DEFAULT_DEADLINE_S
from .audio import is_page_microphone, open_audio
from .codec import NeuralCodec
from .receive import Receiver, add_audio_args, close_recorder, open_recorder, open_sink
from .send import DEFAULT_KBPS, P_FRAMES, Sender, add_audio_arg, learned_coder
from .session import DEFAULT_KEYFRAME_INTERVAL, DEFAULT_RECOVERY, RECOVERIES
from .signaling import KIND_AUDIO, KIND_CAMERA, Picture, Signaling, resolve_server
from .sources import BrowserSource, FrameSource, open_source
from .stats import FrameLog

ROLE = "caller"
OFFERER, ANSWERER = "offerer", "answerer"
DIRECTIONS = (OFFERER, ANSWERER)


def label(kind: str, whose: str) -> str:
    """A data channel's label: `latents/offerer` carries the offerer's frames."""
    return f"{kind}/{whose}"


def parse_label(text: str) -> tuple[str, str] | None:
    """(kind, whose) of one of the call's channel labels; None for anything else."""
    kind, _, whose = text.partition("/")
    if kind in (T.LATENT_LABEL, T.META_LABEL) and whose in DIRECTIONS:
        return kind, whose
    return None


class Call:
    """Both halves of a two-way call on one peer connection."""

    def __init__(self, tx: Sender, rx: Receiver, sig: Signaling, cfg: T.TransportConfig, *,
                 ice_addresses: list[str] | None = None, stun: list[str] = (), quiet: bool = False,
                 stay: bool = False) -> None:
        self.tx, self.rx, self.sig, self.cfg = tx, rx, sig, cfg
        self.ice, self.stun, self.quiet, self.stay = ice_addresses, list(stun), quiet, stay
        self.pc: Any = None
        self.other: str | None = None  # the other caller's peer id while a call is up (or being set up)
        self.me: str | None = None  # OFFERER or ANSWERER in the current call
        self.calls = 0
        self.hung_up = False  # the other caller said bye
        self.ended = asyncio.Event()  # the call is over (the other hung up; without --stay)
        self._mine: dict[str, Any] = {}  # the answerer's sending channels as they arrive
        # -- what this caller's page steers (docs/protocol.md, "A caller's page") --
        self.page_hangup = asyncio.Event()  # the page's hang-up button: bye, then end
        self.camera_muted = False  # no new frames leave (the source's frames are discarded)
        # the audio sender reads this: while True it sends silence (or nothing); the page also
        # stops sending its microphone's PCM
        self.mic_muted = False
        # the page's microphone (--source browser): a streamer.audio.PushedAudioSource, set by
        # the audio part; each kind-4 chunk goes to its push(samples int16 ndarray, sample_rate)
        self.pushed_audio: Any = None
        self.pcm_chunks = 0  # kind-4 chunks from the page
        self.pcm_unheard = 0  # ... that found no pushed_audio to take them
        self.pcm_bad = 0

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"call: {text}", flush=True)

    # -- peer connection -------------------------------------------------------------------
    async def start_call(self, other: str) -> None:
        """We were in the room first: offer, with all four channels."""
        await self.close_call()
        self.other, self.me = other, OFFERER
        pc = self.pc = T.create_peer_connection(self.stun)
        self._watch(pc, other)
        self.tx.add_audio(pc)  # our sound, and theirs on the same connection (before the offer)
        pc.on("track", self.rx.take_track)
        ch = {(kind, whose): pc.createDataChannel(label(kind, whose), **self._options(kind))
              for whose in DIRECTIONS for kind in (T.LATENT_LABEL, T.META_LABEL)}
        self.tx.attach(pc, ch[T.LATENT_LABEL, OFFERER], ch[T.META_LABEL, OFFERER], other)
        self.rx.begin(other)
        self.rx.attach(ch[T.LATENT_LABEL, ANSWERER], True)
        self.rx.attach(ch[T.META_LABEL, ANSWERER], False)
        self._opened(other)
        await self.sig.signal(other, await T.make_offer(pc, self.ice))

    async def on_offer(self, other: str, offer: dict[str, Any]) -> None:
        """The other caller was there first: answer; its channels arrive with the connection."""
        await self.close_call()
        self.other, self.me = other, ANSWERER
        pc = self.pc = T.create_peer_connection(self.stun)
        self._watch(pc, other)
        pc.on("track", self.rx.take_track)
        self.rx.begin(other)
        self._mine = {}

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if pc is not self.pc or (parsed := parse_label(channel.label)) is None:
                return  # a channel of another call, or not one of ours: ignored
            kind, whose = parsed
            if whose == OFFERER:  # the other caller's frames (and our requests back)
                self.rx.attach(channel, kind == T.LATENT_LABEL)
                return
            self._mine[kind] = channel
            if len(self._mine) == 2:
                self.tx.attach(pc, self._mine[T.LATENT_LABEL], self._mine[T.META_LABEL], other)

        try:
            answer = await T.accept_offer(pc, offer, self.ice, self.tx.add_audio)  # our sound before the answer
        except Exception as e:  # noqa: BLE001 - a bad offer must not end the call program
            print(f"call: could not answer the other caller's offer: {e}", file=sys.stderr)
            return
        self._opened(other)
        await self.sig.signal(other, answer)

    def _options(self, kind: str) -> dict[str, Any]:
        if kind == T.LATENT_LABEL:
            return self.cfg.channel_options()
        return {"ordered": False, "maxRetransmits": 0}  # as transport.create_channels' meta

    def _opened(self, other: str) -> None:
        self.calls += 1
        again = " again" if self.calls > 1 else ""
        self.say(f"calling {other}{again} ({'we offer' if self.me == OFFERER else 'it offers'}, "
                 f"{self.cfg.mode})")

    def _watch(self, pc: Any, other: str) -> None:
        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc is not self.pc:
                return
            if pc.connectionState == "connected":
                self.say(f"call open with {other}")
            elif pc.connectionState == "failed":
                print("call: the peer connection failed", file=sys.stderr)
                await self.close_call(keep_other=True)
                if self.me == OFFERER:  # the offerer offers again; the answerer waits for it
                    await asyncio.sleep(1.0)
                    if self.pc is None and self._present(other):
                        await self.start_call(other)

    def _present(self, peer_id: str) -> bool:
        return any(p.get("peer_id") == peer_id and p.get("role") == ROLE for p in self.sig.peers)

    async def close_call(self, keep_other: bool = False) -> None:
        """Tear the shared peer connection down (bounded: aiortc's close can stall or raise)."""
        pc, self.pc = self.pc, None
        self.tx.detach()
        self.rx.open, self.rx.meta_channel = False, None
        self._mine = {}
        if not keep_other:
            self.other = None
        if pc is not None:
            await cli.bounded(pc.close())

    # -- signaling -------------------------------------------------------------------------
    async def signaling_loop(self) -> None:
        if (first := self.sig.peer_with_role(ROLE)) is not None:
            self.say(f"{first} is in the call: waiting for its offer")
            self.other = first
        else:
            self.say("waiting for the other caller to join")
        async for msg in self.sig.messages():
            if isinstance(msg, Picture):
                self.on_page_picture(msg)  # (the server passes on only our own page's)
                continue
            t, frm = msg.get("type"), msg.get("from")
            if t == "peer_joined" and msg.get("role") == ROLE:
                await self.start_call(str(msg.get("peer_id")))  # we were here first: we offer
            elif t == "peer_left" and msg.get("role") == ROLE and msg.get("peer_id") == self.other:
                if not self.hung_up:
                    self.say("lost the other caller (no hang-up); waiting for it to come back")
                await self.close_call()
            elif t == "signal" and isinstance(data := msg.get("data"), dict) and self._present(str(frm)):
                await self._on_signal(str(frm), data)
            elif t == "stats" and msg.get("from_role") == ROLE and frm == self.other:
                stats = msg.get("stats")
                if isinstance(stats, dict):
                    self.tx.peer_stats = stats
                    self.tx._feedback(stats)  # their receive numbers drive our rate controller
            elif t == "hangup":
                self.say("hung up from the page")
                self.page_hangup.set()
            elif t == "mute":
                self.on_mute(msg)
            elif t == "set_bitrate":
                answer = self.tx._set_bitrate(msg)
                if answer["ok"]:
                    self.say(f"bitrate target now {answer['target_kbps']:g} kbps")
                await self.sig.send_json(answer)
            elif t == "error" and not self.quiet:
                print(f"call: server says: {msg.get('message')} ({msg.get('code')})", file=sys.stderr)

    # -- the page ----------------------------------------------------------------------------
    def on_page_picture(self, pic: Picture) -> None:
        """Our page's camera frame (kind 3, into our sender when --source browser) or
        microphone chunk (kind 4, to pushed_audio)."""
        if pic.kind == KIND_CAMERA and isinstance(self.tx.source, BrowserSource):
            if not self.camera_muted:
                self.tx.source.push_jpeg(pic.jpeg, pic.timestamp_us)
        elif pic.kind == KIND_AUDIO:
            self.on_pcm(pic.jpeg)

    def on_pcm(self, payload: bytes) -> None:
        # while muted, chunks on their way are dropped (the page stops sending too)
        if not self.mic_muted and self.pushed_audio is None:
            self.pcm_unheard += 1
        elif not self.mic_muted:
            try:
                self.pushed_audio.push_pcm(payload)
            except ValueError:
                self.pcm_bad += 1  # (the server checked it already: only a bug gets here)
                return
        self.pcm_chunks += 1

    def on_mute(self, msg: dict[str, Any]) -> None:
        camera, mic = msg.get("camera"), msg.get("microphone")
        if not (isinstance(camera, bool) and isinstance(mic, bool)):
            return
        if camera != self.camera_muted:
            self.say(f"camera {'muted: no frames are sent' if camera else 'on again'} (from the page)")
        if mic != self.mic_muted:
            self.say(f"microphone {'muted' if mic else 'on again'} (from the page)")
        self.camera_muted, self.mic_muted = camera, mic
        self.tx.source.muted = camera
        if self.tx.audio is not None:
            self.tx.audio.muted = mic  # our track sends silence meanwhile

    async def _on_signal(self, frm: str, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "offer" and "sdp" in data:
            self.hung_up = False
            await self.on_offer(frm, data)
        elif kind == "answer" and "sdp" in data and frm == self.other and self.me == OFFERER and self.pc is not None:
            try:
                await T.accept_answer(self.pc, data, self.ice)
            except Exception as e:  # noqa: BLE001 - a bad answer: wait for the next call
                print(f"call: bad answer from the other caller: {e}", file=sys.stderr)
        elif kind == "bye" and frm == self.other:
            self.hung_up = True
            await self.close_call()
            if self.stay:
                self.say("the other caller hung up; waiting for the next one")
            else:
                self.say("the other caller hung up; the call is over")
                self.ended.set()

    # -- stats -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Our receive direction at the top level (the other caller's rate controller reads it),
        our send direction under "send"."""
        # (source, capture_fps, frame_size: a page that is our camera sends just what we use)
        send = {**self.tx.snapshot(), "camera_muted": self.camera_muted, "mic_muted": self.mic_muted,
                "source": self.tx.source.name, "capture_fps": self.tx.source.fps,
                "frame_size": self.tx.source.size}
        return {**self.rx.snapshot(), "send": send}

    async def stats_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            snap = self.snapshot()
            if not self.quiet and self.pc is not None:
                print(f"{self.tx.stats.line(snap['send'])} || {self.rx.stats.line(snap)}", flush=True)
            self.rx._say_foreign()
            await self.sig.send_stats(snap)

    # -- running ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.tx.source.start()
        tasks = [asyncio.ensure_future(c) for c in (self.signaling_loop(), self.tx.capture_loop(),
                                                     self.rx.decode_loop(), self.stats_loop())]
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, self.ended, self.page_hangup)]
        try:
            done, _ = await asyncio.wait([tasks[0], tasks[1], *waits], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t in tasks and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # e.g. SourceError from the capture thread
        finally:
            for w in waits:
                w.cancel()
            if self.other is not None and not self.hung_up and self._present(self.other):
                await cli.bounded(self.sig.signal(self.other, {"type": "bye"}), 0.5)  # hang up
            # the signaling socket first (see streamer.send: a loop stuck in aiortc's close
            # then finds its message stream ended)
            await cli.bounded(self.sig.close())
            await cli.finish_tasks(tasks)
            await self.close_call()
            self.tx.release()
            self.rx.release()

    @property
    def exit_code(self) -> int:
        return self.rx.exit_code  # 1 when the recording failed

    def summary(self) -> dict[str, Any]:
        return {"role": ROLE, "calls": self.calls, "hung_up_by_other": self.hung_up,
                "send": self.tx.summary(), "recv": self.rx.summary()}


# -- the program ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m streamer.call", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("join_url", nargs="?", metavar="URL", help="the caller link (the same as --url)")
    cli.add_common_args(ap)
    ap.add_argument("--source", default="auto",
                    help="auto (webcam, else the sample clip) | sample | synthetic | webcam[:DEVICE] | PATH | "
                    "browser (the camera and microphone of the page link this program prints)")
    ap.add_argument("--fps", type=float, default=30.0, help="capture rate (default 30)")
    add_audio_arg(ap)
    add_audio_args(ap)
    ap.add_argument("--size", type=int, default=0, help="model input side (default: the model's own); "
                    "both callers need the same")
    ap.add_argument("--kbps", type=float, default=None,
                    help=f"bitrate to hold for our picture (default {DEFAULT_KBPS:g}; 0: every frame at --level)")
    ap.add_argument("--level", type=int, default=None, help="a fixed quantizer level instead of --kbps")
    ap.add_argument("--keyframe-interval", type=int, default=DEFAULT_KEYFRAME_INTERVAL, metavar="FRAMES",
                    help=f"periodic recovery at least every this many frames (default {DEFAULT_KEYFRAME_INTERVAL})")
    ap.add_argument("--recovery", choices=RECOVERIES, default=DEFAULT_RECOVERY,
                    help=f"how the other caller's broken reference is answered (default {DEFAULT_RECOVERY})")
    ap.add_argument("--p-frames", choices=P_FRAMES, default="tables",
                    help="how our P-frames are coded: tables (default) or learned, as streamer.send's")
    ap.add_argument("--transport", choices=T.TRANSPORTS, default=T.DEFAULT_TRANSPORT,
                    help="slices (default) | lifetime, as streamer.send's")
    ap.add_argument("--lifetime-ms", type=int, default=T.DEFAULT_LIFETIME_MS, help="packet lifetime (lifetime transport)")
    ap.add_argument("--measure", action="store_true", help="send the PSNR of our own decode per frame")
    ap.add_argument("--record", metavar="PATH", help="record the other caller's picture (H.264 or MPEG-4) and "
                    "sound (AAC) into one file")
    ap.add_argument("--deadline-ms", type=float, default=DEFAULT_DEADLINE_S * 1000,
                    help="show a frame with missing slices (concealed) this long after its first slice")
    ap.add_argument("--frame-log", metavar="PATH", help="JSON lines per shown frame (as streamer.receive's)")
    ap.add_argument("--stay", action="store_true",
                    help="when the other caller hangs up, wait for the next one instead of ending")
    args = ap.parse_args(argv)
    if args.join_url:
        if args.url and args.url != args.join_url:
            ap.error("give the join URL once: as URL or as --url")
        args.url = args.join_url
    # the one-way programs' options a call does not offer
    args.simulate_loss, args.loss_seconds, args.share_original, args.intra_only = 0.0, 0.0, False, False
    return args


def check_args(args: argparse.Namespace) -> None:
    from . import receive, send

    send.check_args(args)
    receive.check_args(args)


async def amain(args: argparse.Namespace, stop: asyncio.Event | None = None,
                on_start: Callable[[Call], None] | None = None) -> Call:
    """Run one caller until `stop`, --seconds, the other's hang-up, or the server closes."""
    stop = stop or asyncio.Event()
    check_args(args)
    # (a link of another role is said here, before the model loads)
    server, room, token = resolve_server(args.server, args.room, args.token, args.url, ROLE)
    sys.setswitchinterval(0.001)  # the event loop shares the GIL with two codec threads
    ice = list(T.check_ice_addresses(args.ice_address)) if args.ice_address else None
    cfg = T.TransportConfig(args.transport, args.lifetime_ms)
    T.tune_sctp(args.sctp_rto_min)
    codec: NeuralCodec = cli.load_codec(args.weights, args.backend, args.threads, args.backend_precision,
                                        args.backend_cache)
    codec.quantizer.check_level(args.level)
    # none for this model: say so before joining the room
    learned = learned_coder(codec) if args.p_frames == "learned" else None
    size = cli.check_frame_size(codec, args.size)
    source: FrameSource = open_source(args.source, size, args.fps, quiet=args.quiet)
    try:
        audio = open_audio(args.audio, source, quiet=args.quiet)
    except BaseException:
        source.close()
        raise
    sig = Signaling(server, room, token, ROLE, name="streamer.call")
    try:
        await sig.connect()
    except BaseException:
        source.close()
        audio.close()
        raise
    loop = asyncio.get_running_loop()
    try:
        recorder = open_recorder("call", args.record, args.fps)
    except BaseException:
        source.close()
        audio.close()
        await sig.close()
        raise
    if not args.quiet:
        print(f"call: joined room {room!r} at {server} as {sig.peer_id}; source {source.name}, sound {audio.name}, at "
              f"{size}x{size} {args.fps:g} fps; model {codec.name} ({codec.model_id:08x})", flush=True)
    if (page := sig.page_url()) is not None:
        # always printed (even --quiet): the one link that shows this person's call and steers it
        feeds = " (its camera and microphone feed this call)" if isinstance(source, BrowserSource) else ""
        print(f"page: {page}   <- open this in your browser{feeds}; it is yours: don't share it", flush=True)
    # share_original: our own picture for our page ("you", small) and the frame-aligned
    # original next to the decoded one on the other's page; only while a page watches
    tx = Sender(codec, source, sig, cfg, ice_addresses=ice, stun=args.stun, measure=args.measure, quiet=True,
                share_original=True,
                level=args.level, keyframe_interval=args.keyframe_interval, kbps=args.kbps or None,
                recovery=args.recovery, audio=audio, learned=learned)
    rx = Receiver(codec, sig, ice_addresses=ice, stun=args.stun, recorder=recorder, fps=args.fps,
                  frame_log=FrameLog(args.frame_log), deadline_s=args.deadline_ms / 1000, quiet=True,
                  frame_size=size, audio=open_sink("call", args, recorder))
    call = Call(tx, rx, sig, cfg, ice_addresses=ice, stun=args.stun, quiet=args.quiet, stay=args.stay)
    if is_page_microphone(audio) and isinstance(source, BrowserSource):
        call.pushed_audio = audio  # the page's microphone (kind 4) is our sound
    if on_start is not None:
        on_start(call)
    if args.seconds:
        loop.call_later(args.seconds, stop.set)
    started = time.monotonic()
    try:
        await call.run(stop)
    finally:
        await cli.bounded(sig.close())
        if not await close_recorder("call", recorder, args.record, args.quiet):
            rx.exit_code = 1
        rx.frame_log.close()
    if call.hung_up and not args.quiet:
        print(f"call: ended after {time.monotonic() - started:.0f} s", flush=True)
    cli.report_end("call", sig, stop if not call.ended.is_set() else call.ended, args.summary, call.summary)
    return call


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_program("call", lambda stop: amain(args, stop))


if __name__ == "__main__":
    cli.exit_now(main())
