"""End-to-end calls on loopback: sender -> call server (signaling) -> receiver, in one process.

The server is the real one (`server.app.run_server`); sender and receiver are the real programs'
`amain`s; ICE is restricted to 127.0.0.1. Sources run at a modest fps so the checks are about
delivery and correctness, not about the speed of a shared CI CPU (the bench measures speed).
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import socket

import av
import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from server.app import run_server
from server.protocol import KIND_CAMERA, KIND_DECODED, pack_frame, unpack_frame
from streamer import receive, send
from streamer.codec import bitstream
from streamer.session import FrameType
from streamer.signaling import SignalingError, parse_join_url

from aio import Running, wait_until
from hostile_pictures import hostile_pictures

ROOM, SECRET = "test", "room-secret"  # each role's token derives from the room's secret
pytestmark = pytest.mark.timeout(120)


def common(srv, role: str) -> list[str]:
    """The options of one end of the call: it joins with its own role's token."""
    return ["--server", srv.ws_url, "--room", ROOM, "--token", srv.token(ROOM, role),
            "--ice-address", "127.0.0.1", "--quiet"]


def test_call_delivers_bit_exact_latents_and_survives_bad_packets(tmp_path):
    decoded: dict[int, np.ndarray] = {}
    sent_codes: dict[int, tuple[np.ndarray, int]] = {}

    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            rx = Running(receive, common(srv, "receiver") + ["--record", str(tmp_path / "call.mp4")])
            await wait_until(lambda: rx.obj is not None)
            show = rx.obj.show

            def spy_show(frame, image):  # keep what the receiver shows
                if frame.complete and len(decoded) < 8:
                    decoded[frame.frame_number] = image
                show(frame, image)
            rx.obj.show = spy_show

            tx = Running(send, common(srv, "sender") + ["--source", "synthetic", "--fps", "5", "--measure"])
            await wait_until(lambda: tx.obj is not None)
            encode = tx.obj._encode

            def spy_encode(cap, number, level):  # keep what the sender encoded
                cand = encode(cap, number, level)
                if len(sent_codes) < 40 or number in sent_codes:  # (a dropped frame's number is reused)
                    sent_codes[number] = (cand.q.codes.copy(), cand.q.level)  # (the rate control's level)
                return cand
            tx.obj._encode = spy_encode

            await wait_until(lambda: rx.obj.shown >= 12)
            # inject corrupt, truncated and foreign packets into the live data channel
            good = bitstream.pack_frame(tx.obj.codec.encode(np.zeros((224, 224, 3), np.uint8)),
                                        tx.obj.codec.model_id, 10**6, 0, 1160)[0]
            flipped = bytearray(good)
            flipped[100] ^= 1
            foreign = bitstream.rewrite_header(good, model_id=0x01020304)  # another model's, valid CRC
            bad = [bytes(flipped), good[:50], good[:-1], b"hello", bytes(foreign), "text message"]
            for b in bad:
                tx.obj.channel.channel.send(b)
            shown_before = rx.obj.shown
            await wait_until(lambda: rx.obj.shown >= shown_before + 18)  # the call goes on
            txo = await tx.finish()
            await asyncio.sleep(1.0)
            rxo = await rx.finish()
            return txo, rxo

    txo, rxo = asyncio.run(main())
    sent = txo.frame_number
    n = rxo.assembler.n
    assert sent >= 30
    assert n.bad_packets + n.foreign == 6 and n.foreign >= 1
    assert rxo.shown >= 0.9 * sent, (rxo.shown, sent, n, rxo.stats.totals)
    assert rxo.mismatched == 0 and rxo.verified >= 0.9 * sent, (rxo.verified, sent, n, len(rxo._meta))
    # after the first I-frame the call runs on P-frames, against references held in lock-step
    assert txo.session.frames[FrameType.INTRA] >= 1 and txo.session.frames[FrameType.INTER] >= 0.8 * sent
    # the receiver's pictures are exactly the sender's own decode of the same codes
    codec = txo.codec
    common_frames = [f for f in decoded if f in sent_codes]
    assert len(common_frames) >= 3
    for f in common_frames:
        codes, level = sent_codes[f]
        assert np.array_equal(decoded[f], codec.decode_latents(codec.latents(codes, level=level)))
    # --measure: the sender's PSNR reached the receiver's stats
    assert any(h.get("psnr") is not None for h in rxo.stats.history)
    # --record wrote a playable file
    with av.open(str(tmp_path / "call.mp4")) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames >= 0.8 * rxo.shown


@pytest.mark.slow
def test_receiver_resumes_after_the_sender_restarts():
    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            rx = Running(receive, common(srv, "receiver"))
            await wait_until(lambda: rx.obj is not None)
            a = Running(send, common(srv, "sender") + ["--source", "synthetic", "--fps", "10"])
            await wait_until(lambda: rx.obj.shown >= 10)
            await a.finish()  # the sender quits (says bye)
            first = rx.obj.shown
            b = Running(send, common(srv, "sender") + ["--source", "sample", "--fps", "10"])
            try:
                await wait_until(lambda: rx.obj.shown >= first + 10)
            except AssertionError:
                raise AssertionError((rx.obj.shown, first, rx.obj.assembler.n, b.obj and b.obj.summary()))
            # a third sender joins while b runs: it replaces b, b ends by itself
            c = Running(send, common(srv, "sender") + ["--source", "synthetic", "--fps", "10"])
            await asyncio.wait_for(b.task, 20)
            second = rx.obj.shown
            await wait_until(lambda: rx.obj.shown >= second + 10)
            await c.finish()
            return await rx.finish()

    rxo = asyncio.run(main())
    assert rxo.calls == 3
    assert rxo.assembler.n.restarts + rxo.calls >= 3  # numbering restarted without confusing it
    assert rxo.mismatched == 0


@pytest.mark.slow
def test_viewer_gets_stats_and_pictures_and_can_be_the_camera():
    """The camera link's browser feeds the sender; hostile pictures from it (a 65500² header, a
    65000×1 strip, a 12000² PNG) are skipped as SourceErrors and the call goes on."""
    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            async with connect(srv.ws_url) as viewer:
                await viewer.send(json.dumps({"type": "join", "room": ROOM, "role": "viewer",
                                              "token": srv.token(ROOM, "camera")}))
                assert json.loads(await viewer.recv())["type"] == "joined"
                await viewer.send(json.dumps({"type": "camera", "on": True}))
                rx = Running(receive, common(srv, "receiver"))
                tx = Running(send, common(srv, "sender") + ["--source", "browser", "--fps", "10", "--share-original"])
                stats, kinds = set(), set()
                buf = io.BytesIO()
                Image.fromarray(np.full((240, 320, 3), 90, np.uint8)).save(buf, format="JPEG")
                camera = buf.getvalue()
                loop = asyncio.get_running_loop()
                n = 0

                async def feed(until, seconds: float) -> None:
                    nonlocal n
                    end = loop.time() + seconds
                    while loop.time() < end and not until():
                        n += 1
                        await viewer.send(pack_frame(KIND_CAMERA, n, camera))
                        try:
                            msg = await asyncio.wait_for(viewer.recv(), 0.1)
                        except TimeoutError:
                            continue
                        if isinstance(msg, bytes):
                            h, jpeg = unpack_frame(msg)
                            kinds.add(h.kind)
                            if h.kind == KIND_DECODED:
                                assert Image.open(io.BytesIO(jpeg)).size == (224, 224)
                        else:
                            m = json.loads(msg)
                            if m["type"] == "stats":
                                stats.add(m["from_role"])
                                assert "fps" in m["stats"]

                await feed(lambda: KIND_DECODED in kinds and {"sender", "receiver"} <= stats, 40)
                shown = rx.obj.shown
                source = tx.obj.source
                for i, bad in enumerate(hostile_pictures(), 1):  # one at a time: only the newest waits
                    await asyncio.sleep(0.2)  # past the server's camera-rate limit
                    n += 1
                    await viewer.send(pack_frame(KIND_CAMERA, n, bad))
                    await wait_until(lambda: source.bad >= i, 10)
                await feed(lambda: rx.obj.shown >= shown + 10, 30)
                assert not tx.task.done(), "the sender ended"
                bad = source.bad
                await tx.finish()
                rxo = await rx.finish()
                return kinds, stats, rxo, shown, bad

    kinds, stats, rxo, shown_before, bad = asyncio.run(main())
    assert KIND_DECODED in kinds and 2 in kinds  # decoded and (shared) original pictures
    assert {"sender", "receiver"} <= stats
    assert bad == 3  # each hostile picture refused
    assert rxo.shown >= shown_before + 10  # and the call went on after them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_and_bad_token_are_clear_messages(capsys):
    port = free_port()  # nothing listens here
    rc = send.main(["--server", f"ws://127.0.0.1:{port}/ws", "--room", "r", "--token", "t", "--source", "synthetic"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the call server" in err and "Traceback" not in err

    async def bad_token():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            args = receive.parse_args(["--server", srv.ws_url, "--room", ROOM, "--token", "wrong", "--quiet"])
            with pytest.raises(SignalingError, match="bad_token"):
                await receive.amain(args)
            # an unknown room answers like a wrong token: a guess tells nothing
            args = receive.parse_args(["--server", srv.ws_url, "--room", "nope", "--token",
                                       srv.token(ROOM, "receiver"), "--quiet"])
            with pytest.raises(SignalingError, match="bad_token"):
                await receive.amain(args)
            # another role's token: refused by the server ...
            args = receive.parse_args(["--server", srv.ws_url, "--room", ROOM, "--token",
                                       srv.token(ROOM, "viewer"), "--quiet"])
            with pytest.raises(SignalingError, match="bad_token"):
                await receive.amain(args)
            # ... and another role's link: said before joining
            args = receive.parse_args(["--url", srv.join_url(ROOM, "viewer"), "--quiet"])
            with pytest.raises(SignalingError, match="receiver:"):
                await receive.amain(args)
    asyncio.run(bad_token())
    rc = receive.main(["--room", "r"])  # no token
    assert rc == 2 and "--token" in capsys.readouterr().err


def test_join_url_parsing():
    assert parse_join_url("http://127.0.0.1:8765/?room=demo&token=abc") == ("ws://127.0.0.1:8765/ws", "demo", "abc")
    assert parse_join_url("https://example.org/?room=a&token=b")[0] == "wss://example.org/ws"
    # the role a link is for travels with its token, and a link of another role is refused
    ws, room, token = parse_join_url("http://h:1/?room=r&token=t&role=sender", role="sender")
    assert (room, token, token.role) == ("r", "t", "sender")
    assert parse_join_url("http://h:1/?room=r&token=t&role=camera", role="viewer")[2].role == "camera"
    with pytest.raises(SignalingError, match="sender:"):
        parse_join_url("http://h:1/?room=r&token=t&role=viewer", role="sender")
    with pytest.raises(SignalingError, match="unknown role"):
        parse_join_url("http://h:1/?room=r&token=t&role=admin")
    with pytest.raises(SignalingError):
        parse_join_url("http://127.0.0.1:8765/?room=demo")
    with pytest.raises(SignalingError):
        parse_join_url("not a url")


@pytest.mark.slow
def test_forged_packets_are_refused_and_the_frame_rate_holds():
    """The two hand-found attacks (a 34-byte range packet claiming 24x1024x1024 latents, a
    24,610-byte raw slice of an 8192x8192 frame; valid CRCs), ten pairs a second through the
    live channel for 4 s: all refused as foreign, and the receiver keeps showing the frames the
    sender sends (before the fix one such packet held the receiver's event loop for 5 s)."""
    from streamer.bench.fuzz import attack_range_packet, attack_raw_slice

    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            rx = Running(receive, common(srv, "receiver"))
            tx = Running(send, common(srv, "sender") + ["--source", "synthetic", "--fps", "10"])
            await wait_until(lambda: rx.obj is not None and rx.obj.shown >= 10)

            async def window(seconds: float, attack: bool) -> tuple[int, int, int]:
                shown, sent, injected = rx.obj.shown, tx.obj.frame_number, 0
                loop = asyncio.get_running_loop()
                end = loop.time() + seconds
                mid = tx.obj.codec.model_id
                while loop.time() < end:
                    ch = tx.obj.channel
                    # (not past what the channel can carry: the call's own frames need room too)
                    if attack and ch is not None and ch.channel.bufferedAmount < 64 * 1024:
                        for forged in (attack_range_packet(mid), attack_raw_slice(mid)):
                            ch.channel.send(forged)
                            injected += 1
                    await asyncio.sleep(0.1)
                return rx.obj.shown - shown, tx.obj.frame_number - sent, injected

            before = await window(4, attack=False)
            during = await window(4, attack=True)
            await asyncio.sleep(0.5)
            foreign = rx.obj.assembler.n.foreign
            await tx.finish()
            await rx.finish()
            return before, during, foreign

    (shown_before, sent_before, _), (shown, sent, injected), foreign = asyncio.run(main())
    assert injected >= 40 and foreign >= 0.8 * injected, (injected, foreign)
    assert sent >= 20 and shown >= 0.9 * sent - 2, (shown, sent, shown_before, sent_before)


def test_a_call_on_learned_p_frames_holds_the_reference_and_recovers_from_an_injected_mismatch():
    """`--p-frames learned`: the learned coder's P-frames over the real data channel, decoded on
    the receiver's own integer reference; a mismatch injected into that reference (what a bit flip
    or a divergent CPU would cause) is caught by the packet's CRC, never shown, and healed by the
    I-frame the receiver asks for."""

    def corrupt(assembler):
        # the reference the next frame decodes on, not the frame it came from: that one may still
        # wait to be shown (and its CRC checked against the sender's), untouched
        prev = assembler._prev
        if prev is not None and prev.learned_ref is not None:
            wrong = copy.copy(prev)
            wrong.learned_ref = prev.learned_ref.clone()
            wrong.learned_ref[0, 4, 9, 9] += 3
            assembler._prev = wrong
        return []

    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            rx = Running(receive, common(srv, "receiver"))
            await wait_until(lambda: rx.obj is not None)
            tx = Running(send, common(srv, "sender") + ["--source", "sample", "--fps", "5", "--audio", "none",
                                                        "--p-frames", "learned"])
            n = lambda: rx.obj.assembler.n  # noqa: E731
            await wait_until(lambda: n().learned >= 8, timeout=90)
            while n().learned_mismatched == 0:  # (a no-op while the last frame is an I-frame)
                rx.obj._hand_to_parser(corrupt, rx.obj.assembler)
                await asyncio.sleep(0.5)
            healed_from = n().learned
            await wait_until(lambda: n().learned >= healed_from + 6, timeout=60)
            txo = await tx.finish()
            await asyncio.sleep(1.0)
            return txo, await rx.finish()

    txo, rxo = asyncio.run(main())
    n = rxo.assembler.n
    assert n.learned_mismatched >= 1 and rxo.keyframe_requests >= 1
    assert txo.session.recovery == "keyframe" and txo.session.frames[FrameType.INTRA] >= 2
    # every shown frame whose CRC came was the sender's: the mismatched frame was never shown whole
    assert rxo.mismatched == 0 and rxo.verified >= 0.8 * n.learned, (rxo.verified, n)
    assert n.bad_packets == 0 and n.foreign == 0
