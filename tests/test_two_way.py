"""A two-way call on loopback (streamer.call): two callers, one RTCPeerConnection between them,
both directions delivering frames whose codes the receivers prove bit-exact by CRC; each
direction's recovery requests reach the session that sends it; a third caller is refused; a
hang-up ends the other caller's call. The server is the real one; ICE is restricted to
127.0.0.1; sources run at a modest fps (the bench measures speed: `bench call --two-way`).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server.app import run_server
from streamer import call
from streamer.assembler import codes_crc
from streamer.signaling import Signaling, SignalingError

import aio

ROOM, SECRET = "two-way", "room-secret"
pytestmark = pytest.mark.timeout(150)


def common(srv) -> list[str]:
    return ["--server", srv.ws_url, "--room", ROOM, "--token", srv.token(ROOM, "caller"),
            "--ice-address", "127.0.0.1", "--quiet"]


async def wait_until(cond, timeout: float = 40.0) -> None:
    await aio.wait_until(cond, timeout)  # a two-way call takes longer to set up


class Caller:
    def __init__(self, argv: list[str]) -> None:
        self.stop = asyncio.Event()
        self.obj: call.Call | None = None
        self.task = asyncio.ensure_future(call.amain(call.parse_args(argv), self.stop, self._started))
        self.codes: dict[int, np.ndarray] = {}
        self.shown_crc: dict[int, int] = {}  # frames it showed whole on a good reference: their codes' CRC
        self.shown_numbers: set[int] = set()  # every frame it showed

    def _started(self, obj: call.Call) -> None:
        self.obj = obj
        encode = obj.tx._encode

        def spy(cap, number, level):  # what this caller encoded, by frame number
            cand = encode(cap, number, level)
            self.codes[number] = cand.q.codes.copy()
            return cand
        obj.tx._encode = spy
        show = obj.rx.show

        def spy_show(frame, image):
            self.shown_numbers.add(frame.frame_number)
            # (a whole P-frame on a reference a concealed frame broke is known broken until the
            # refresh heals it: the receiver never takes it for the sender's, nor does this)
            if frame.complete and frame.reference_ok:
                self.shown_crc[frame.frame_number] = frame.crc()
            show(frame, image)
        obj.rx.show = spy_show


def test_two_way_call_both_directions_bit_exact_third_refused_hang_up_ends_it():
    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            a = Caller(common(srv) + ["--source", "synthetic", "--fps", "8"])
            await wait_until(lambda: a.obj is not None)
            b = Caller(common(srv) + ["--source", "sample", "--fps", "8", "--measure"])
            await wait_until(lambda: b.obj is not None and a.obj.rx.shown >= 15 and b.obj.rx.shown >= 15)
            A, B = a.obj, b.obj
            # the first caller in the room offered, the second answered: one peer connection
            assert (A.me, B.me) == (call.OFFERER, call.ANSWERER)
            assert A.other == B.sig.peer_id and B.other == A.sig.peer_id
            labels = {ch.label for ch in (A.tx.channel.channel, A.rx.meta_channel, B.tx.channel.channel,
                                          B.rx.meta_channel)}
            assert labels == {"latents/offerer", "meta/answerer", "latents/answerer", "meta/offerer"}

            # a third caller with the same link: refused, and the call goes on
            third = Signaling(srv.ws_url, ROOM, srv.token(ROOM, "caller"), "caller")
            with pytest.raises(SignalingError, match="room_full") as refused:
                await third.connect()
            assert "2 callers" in str(refused.value)

            # each direction's recovery request reaches the session that sends that direction
            ka, kb = A.tx.session.keyframe_requests, B.tx.session.keyframe_requests
            asked_by_b = B.rx.keyframe_requests
            A.rx._last_keyframe_request = 0.0
            A.rx.request_keyframe(A.rx._last_shown if A.rx._last_shown > 0 else 1)  # A asks B
            await wait_until(lambda: B.tx.session.keyframe_requests > kb, 10)
            # A's sender hears only what B's receiver asked for itself (a frame it had to conceal)
            assert A.tx.session.keyframe_requests - ka <= B.rx.keyframe_requests - asked_by_b

            shown_a, shown_b = A.rx.shown, B.rx.shown
            await wait_until(lambda: A.rx.shown >= shown_a + 10 and B.rx.shown >= shown_b + 10)
            # A hangs up: its program ends within 3 s, and B's call ends by itself
            # what each had sent when the call ended (B goes on sending until it hears of it)
            sent = {"a->b": A.tx.frame_number, "b->a": B.tx.frame_number}
            # and let those frames arrive (on a loaded machine a few are on their way each way)
            await wait_until(lambda: a.shown_numbers and b.shown_numbers and max(b.shown_numbers) >= sent["a->b"] - 1
                             and max(a.shown_numbers) >= sent["b->a"] - 1, 10)
            t0 = time.monotonic()
            a.stop.set()
            await asyncio.wait_for(a.task, 10)
            a_exit_s = time.monotonic() - t0
            await asyncio.wait_for(b.task, 10)
            return A, B, a, b, a_exit_s, sent

    A, B, a, b, a_exit_s, sent_by = asyncio.run(main())
    assert a_exit_s < 3.0, a_exit_s
    assert B.hung_up and B.ended.is_set() and not A.hung_up
    for name, tx, rx, receiver in (("a->b", A.tx, B.rx, b), ("b->a", B.tx, A.rx, a)):
        sent = sent_by[name]
        assert sent >= 25, (name, sent)
        shown = sum(n < sent for n in receiver.shown_numbers)
        assert shown >= 0.85 * sent, (name, shown, sent, rx.assembler.n)
        # every complete shown frame's codes CRC checked against the sender's: bit-exact
        # (a frame concealed after a stall of the shared event loop breaks the reference until the
        # refresh heals it: those frames are known broken, never taken for the sender's)
        report = (name, rx.verified, rx.known_broken, rx.mismatched, sent, rx.assembler.n)
        assert rx.mismatched == 0 and rx.verified >= 0.4 * sent, report
        assert rx.verified + rx.known_broken >= 0.8 * sent and rx.assembler.n.concealed <= 2, report
        assert rx.calls == 1
    # and the codes each receiver rebuilt are the ones the other caller made, frame by frame
    for sender, receiver in ((a, b), (b, a)):
        both = [n for n in receiver.shown_crc if n in sender.codes]
        assert len(both) >= 20
        assert all(receiver.shown_crc[n] == codes_crc(sender.codes[n]) for n in both)
    # B measured its PSNR (--measure): A's receiver showed it; the other way nothing was measured
    assert any(h.get("psnr") is not None for h in A.rx.stats.history)
    # the summaries a bench reads
    s = B.summary()
    assert s["role"] == "caller" and s["hung_up_by_other"] and s["send"]["sent"] == B.tx.frame_number


def test_caller_link_errors_are_one_line(capsys):
    # a link of another role: said before the model loads or anything connects
    rc = call.main(["--url", "http://127.0.0.1:1/?room=r&token=t&role=viewer", "--source", "synthetic"])
    err = capsys.readouterr().err
    assert rc == 2 and "caller:" in err and "Traceback" not in err and err.count("\n") == 1
    rc = call.main(["not a url"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a join URL" in err and err.count("\n") == 1
    rc = call.main(["--room", "r"])  # no token
    assert rc == 2 and "--token" in capsys.readouterr().err


def test_server_seats_two_callers_and_routes_between_them():
    """At the protocol level: two callers (one token), a third refused room_full; each learns
    the other (the second from `joined.peers`: it waits for the first's offer); stats carry who
    sent them; a caller's set_bitrate reaches the other caller; viewers get each caller's
    pictures in its own latest-only slot."""
    import json

    from websockets.asyncio.client import connect

    from server.protocol import KIND_DECODED, pack_frame, unpack_frame

    async def join(srv, role: str, credential: str):
        ws = await connect(srv.ws_url)
        await ws.send(json.dumps({"type": "join", "room": ROOM, "role": role,
                                  "token": srv.token(ROOM, credential)}))
        return ws, json.loads(await ws.recv())

    async def next_of(ws, kind: str):
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if m["type"] == kind:
                return m

    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            a, ja = await join(srv, "caller", "caller")
            b, jb = await join(srv, "caller", "caller")
            assert ja["peers"] == [] and [p["peer_id"] for p in jb["peers"]] == [ja["peer_id"]]
            assert (await next_of(a, "peer_joined"))["peer_id"] == jb["peer_id"]  # a offers
            c, jc = await join(srv, "caller", "caller")
            assert jc["type"] == "error" and jc["code"] == "room_full"
            _, jbad = await join(srv, "caller", "viewer")  # another role's token
            assert jbad["code"] == "bad_token"
            v, jv = await join(srv, "viewer", "viewer")
            assert {p["peer_id"] for p in jv["peers"]} == {ja["peer_id"], jb["peer_id"]}
            await a.send(json.dumps({"type": "stats", "stats": {"fps": 1}}))
            m = await next_of(b, "stats")
            assert (m["from_role"], m["from"]) == ("caller", ja["peer_id"])
            await b.send(json.dumps({"type": "set_bitrate", "kbps": 200}))
            m = await next_of(a, "set_bitrate")
            assert (m["kbps"], m["from"]) == (200, jb["peer_id"])
            await a.send(json.dumps({"type": "bitrate", "to": jb["peer_id"], "ok": True, "target_kbps": 200,
                                     "message": "ok"}))
            assert (await next_of(b, "bitrate"))["target_kbps"] == 200
            await a.send(pack_frame(KIND_DECODED, 1, b"\xff\xd8a"))
            await b.send(pack_frame(KIND_DECODED, 2, b"\xff\xd8b"))
            got = set()
            while len(got) < 2:
                msg = await asyncio.wait_for(v.recv(), 5)
                if isinstance(msg, bytes):
                    got.add(unpack_frame(msg)[0].frame)
            assert got == {1, 2}  # neither caller's picture replaced the other's
            await a.close()
            assert (await next_of(b, "peer_left"))["peer_id"] == ja["peer_id"]
            c, jc = await join(srv, "caller", "caller")  # a seat is free again
            assert jc["type"] == "joined"
            for ws in (b, c, v):
                await ws.close()

    asyncio.run(main())


@pytest.mark.slow
def test_a_lost_caller_is_waited_for_and_the_one_in_the_room_offers_again():
    """The offerer's connection to the server dies without a hang-up (no bye): the answerer
    keeps waiting, and when a caller joins again it, now the first in the room, offers; frames
    flow both ways again."""
    async def main():
        async with run_server("127.0.0.1", 0, {ROOM: SECRET}) as srv:
            a = Caller(common(srv) + ["--source", "synthetic", "--fps", "8"])
            await wait_until(lambda: a.obj is not None)
            b = Caller(common(srv) + ["--source", "synthetic", "--fps", "8"])
            await wait_until(lambda: b.obj is not None and a.obj.rx.shown >= 5 and b.obj.rx.shown >= 5)
            first = (a.obj.me, b.obj.me)
            a.obj.sig.ws.transport.abort()  # as a crash: the socket is gone, no bye can leave
            await asyncio.wait_for(a.task, 10)
            await wait_until(lambda: b.obj.pc is None, 10)
            assert not b.task.done() and not b.obj.hung_up  # B waits
            c = Caller(common(srv) + ["--source", "sample", "--fps", "8"])
            await wait_until(lambda: c.obj is not None and c.obj.rx.shown >= 5)
            shown = b.obj.rx.shown
            await wait_until(lambda: b.obj.rx.shown >= shown + 5)
            B, C = b.obj, c.obj
            second = (B.me, C.me)
            b.stop.set()  # B hangs up: C's call ends
            await asyncio.wait_for(asyncio.gather(b.task, c.task), 15)
            return B, C, first, second

    B, C, first, second = asyncio.run(main())
    assert first == (call.OFFERER, call.ANSWERER)
    assert second == (call.OFFERER, call.ANSWERER)  # B, now the first in the room, offered
    assert B.calls == 2 and B.rx.calls == 2 and not B.hung_up
    assert C.hung_up and C.rx.mismatched == 0 and B.rx.mismatched == 0
