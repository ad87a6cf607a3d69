"""A caller's own page ("face") at the protocol level, over real loopback sockets: its token (only
its program gets it), what it may steer (hang up, mute, bitrate, camera and microphone: its own
program only), viewers that stay watch-only, and picture format 2 (the sender field, the old
format refused)."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from server import protocol as P
from server import tokens
from streamer.signaling import Signaling, SignalingError, parse_join_url
from test_server import ROOMS, arun, join, open_ws, quiet_for, recv_type


async def join_face(srv: Any, peer: str, token: str, room: str = "demo") -> tuple[ClientConnection, dict[str, Any]]:
    ws = await open_ws(srv)
    await ws.send(json.dumps({"type": "join", "room": room, "token": token, "role": "face", "peer": peer}))
    return ws, json.loads(await ws.recv())


async def two_callers(srv: Any) -> tuple[ClientConnection, dict[str, Any], ClientConnection, dict[str, Any]]:
    a, ja = await join(srv, "caller")
    b, jb = await join(srv, "caller")
    return a, ja, b, jb


async def next_picture(ws: ClientConnection, timeout: float = 5) -> bytes:
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, bytes):
            return m


async def no_picture(ws: ClientConnection, seconds: float = 0.4) -> bool:
    """True when no binary message arrives within `seconds` (text messages are skipped)."""
    try:
        await next_picture(ws, seconds)
    except asyncio.TimeoutError:
        return True
    return False


def pcm(samples: int = 960, rate: int = 48000) -> bytes:
    return P.pack_pcm(struct.pack(f"<{samples}h", *range(samples)), rate)


def test_only_its_program_gets_the_page_token_and_it_opens_only_that_page() -> None:
    async def body() -> None:
        async with run() as srv:
            a, ja, b, jb = await two_callers(srv)
            secret = ROOMS["demo"]
            assert ja["face_token"] == tokens.face_token(secret, "demo", ja["peer_id"])
            assert jb["face_token"] != ja["face_token"]
            assert ja["face_token"] not in {srv.token("demo", c) for c in tokens.CREDENTIALS}
            # a viewer's joined carries no page token
            v, jv = await join(srv, "viewer")
            assert "face_token" not in jv

            f, jf = await join_face(srv, ja["peer_id"], ja["face_token"])
            assert (jf["type"], jf["role"], jf["face_of"]) == ("joined", "face", ja["peer_id"])
            assert jf["may_set_bitrate"] is True and jf["may_send_camera"] is True
            assert {p["peer_id"] for p in jf["peers"]} == {ja["peer_id"], jb["peer_id"]}
            # the program learns its page is open (the viewers list names what it steers)
            listed = {"peer_id": jf["peer_id"], "role": "viewer", "name": "", "face_of": ja["peer_id"]}
            while listed not in (await recv_type(a, "viewers"))["peers"]:
                pass

            # B holds the same caller link, not A's page token: it cannot open A's page
            for peer, token in ((ja["peer_id"], jb["face_token"]), (ja["peer_id"], srv.token("demo", "caller")),
                                (jb["peer_id"], ja["face_token"])):
                _, refused = await join_face(srv, peer, token)
                assert refused["code"] == P.BAD_TOKEN, (peer, refused)
            _, refused = await join_face(srv, "not-hex!", ja["face_token"])
            assert refused["code"] == P.BAD_MESSAGE and "peer" in refused["message"]
            _, refused = await join_face(srv, ja["peer_id"], ja["face_token"], room="nope")
            assert refused["code"] == P.BAD_TOKEN

            # a second page of the same program replaces the first (a reload, another tab)
            f2, jf2 = await join_face(srv, ja["peer_id"], ja["face_token"])
            assert jf2["type"] == "joined"
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(f.recv(), 5)
            assert f.close_code == P.CLOSE_REPLACED

            # the program gone: its page link opens nothing (one clear, fatal error)
            await a.close()
            await recv_type(f2, "peer_left")
            _, refused = await join_face(srv, ja["peer_id"], ja["face_token"])
            assert refused["code"] == P.UNKNOWN_PEER and "streamer.call" in refused["message"]
            for ws in (b, v, f2):
                await ws.close()
    arun(body())


def run() -> Any:
    from server.app import run_server
    return run_server(rooms=ROOMS)


def test_a_page_steers_its_own_program_only() -> None:
    async def body() -> None:
        async with run() as srv:
            a, ja, b, jb = await two_callers(srv)
            fa, jfa = await join_face(srv, ja["peer_id"], ja["face_token"])
            fb, jfb = await join_face(srv, jb["peer_id"], jb["face_token"])

            await fa.send(json.dumps({"type": "mute", "camera": True, "microphone": False}))
            assert await recv_type(a, "mute") == {"type": "mute", "camera": True, "microphone": False,
                                                  "from": jfa["peer_id"]}
            await fa.send(json.dumps({"type": "mute", "camera": "yes", "microphone": False}))
            err = await recv_type(fa, "error")
            assert (err["code"], err["about"]) == (P.BAD_MESSAGE, "mute")

            # the quality control: the page's own program (its person's sender), not the other's
            await fa.send(json.dumps({"type": "set_bitrate", "kbps": 150}))
            assert await recv_type(a, "set_bitrate") == {"type": "set_bitrate", "kbps": 150,
                                                         "from": jfa["peer_id"]}
            await a.send(json.dumps({"type": "bitrate", "to": jfa["peer_id"], "ok": True,
                                     "target_kbps": 150, "message": "now 150 kbps"}))
            assert (await recv_type(fa, "bitrate"))["target_kbps"] == 150
            # (a caller's own ask still goes to the other caller, as before)
            await b.send(json.dumps({"type": "set_bitrate", "kbps": 200}))
            assert (await recv_type(a, "set_bitrate"))["from"] == jb["peer_id"]

            # camera frames and microphone chunks: to its own program, stamped with the page's id
            await fa.send(P.pack_frame(P.KIND_CAMERA, 1, b"\xff\xd8cam", 5, sender="deadbeef"))
            got = P.unpack_frame(await next_picture(a))
            assert (got[0].kind, got[0].sender, got[1]) == (P.KIND_CAMERA, jfa["peer_id"], b"\xff\xd8cam")
            chunks = [P.pack_frame(P.KIND_AUDIO, n, pcm(), 10 + n) for n in range(5)]
            for chunk in chunks:
                await fa.send(chunk)
            heard = [P.unpack_frame(await next_picture(a)) for _ in chunks]
            assert [h.frame for h, _ in heard] == list(range(5))  # in order, none lost
            assert P.unpack_pcm(heard[0][1]) == (48000, struct.pack("<960h", *range(960)))
            # ... and nothing of it at the other caller
            assert await no_picture(b)
            await fa.send(P.pack_frame(P.KIND_AUDIO, 9, b"\0\0\xbb\x80\x01"))  # odd length
            assert "int16" in (await recv_type(fa, "error"))["message"]
            await fa.send(P.pack_frame(P.KIND_AUDIO, 9, pcm(rate=12345)))
            await fa.send(P.pack_frame(P.KIND_AUDIO, 9, pcm(samples=P.PCM_MAX_SAMPLES + 1)))
            assert await no_picture(a)

            # hang-up: its program gets it, the other caller does not (its program says bye)
            await fb.send(json.dumps({"type": "hangup"}))
            assert await recv_type(b, "hangup") == {"type": "hangup", "from": jfb["peer_id"]}
            assert not [m for m in await quiet_for(a) if m["type"] == "hangup"]

            # the program has left: the page is told, nothing is routed
            await b.close()
            await recv_type(fb, "peer_left")
            await fb.send(json.dumps({"type": "hangup"}))
            err = await recv_type(fb, "error")
            assert err["code"] == P.UNKNOWN_PEER and "left" in err["message"]
            for ws in (a, fa, fb):
                await ws.close()
    arun(body())


def test_viewers_cannot_send_controls() -> None:
    """The viewers' link and the camera link watch a two-way call: no hang-up, mute, microphone or
    camera of a caller, and no bitrate of a caller (the camera link's bitrate is the one-way
    sender's, and there is none)."""
    async def body() -> None:
        async with run() as srv:
            a, ja, b, jb = await two_callers(srv)
            viewer, _ = await join(srv, "viewer")
            camera, _ = await join(srv, "viewer", token=srv.token("demo", "camera"))
            for ws in (viewer, camera):
                await ws.send(json.dumps({"type": "hangup"}))
                err = await recv_type(ws, "error")
                assert (err["code"], err["about"]) == (P.BAD_MESSAGE, "hangup") and "only watches" in err["message"]
                await ws.send(json.dumps({"type": "mute", "camera": True, "microphone": True}))
                assert (await recv_type(ws, "error"))["about"] == "mute"
                await ws.send(P.pack_frame(P.KIND_AUDIO, 1, pcm()))
                assert "only watches" in (await recv_type(ws, "error"))["message"]
                await ws.send(P.pack_frame(P.KIND_CAMERA, 1, b"\xff\xd8cam"))  # no camera owner
                assert (await recv_type(ws, "error"))["code"] == P.BAD_MESSAGE
            await viewer.send(json.dumps({"type": "set_bitrate", "kbps": 100}))
            assert (await recv_type(viewer, "error"))["about"] == "set_bitrate"
            await camera.send(json.dumps({"type": "set_bitrate", "kbps": 100}))
            assert (await recv_type(camera, "bitrate"))["ok"] is False  # no one-way sender here
            for caller in (a, b):
                got = await quiet_for(caller, 0.5)
                assert not [m for m in got if m["type"] in ("hangup", "mute", "set_bitrate")], got
                assert await no_picture(caller, 0.2)
            for ws in (a, b, viewer, camera):
                await ws.close()
    arun(body())


def test_pictures_carry_their_sender_and_the_old_format_is_refused() -> None:
    async def body() -> None:
        async with run() as srv:
            a, ja, b, jb = await two_callers(srv)
            fa, _ = await join_face(srv, ja["peer_id"], ja["face_token"])
            await a.send(P.pack_frame(P.KIND_DECODED, 1, b"\xff\xd8a"))
            await b.send(P.pack_frame(P.KIND_DECODED, 2, b"\xff\xd8b"))
            got = {}
            while len(got) < 2:
                h, jpeg = P.unpack_frame(await next_picture(fa))
                got[h.sender] = (h.frame, jpeg)
            # the page tells the two callers' pictures apart: its own program's (the other person)
            assert got == {ja["peer_id"]: (1, b"\xff\xd8a"), jb["peer_id"]: (2, b"\xff\xd8b")}

            old = struct.pack(">BIQ", P.KIND_DECODED, 3, 4) + b"\xff\xd8old"  # format 1
            await a.send(old)
            await a.send(old)
            err = await recv_type(a, "error")
            assert err["code"] == P.BAD_MESSAGE and "picture format 1" in err["message"]
            assert "format 2" in err["message"]
            assert not [m for m in await quiet_for(a) if m["type"] == "error"]  # once, not per frame
            await a.send(b"\x07" + bytes(40))
            assert "format byte" in (await recv_type(a, "error"))["message"]
            await a.send(b"")  # (an empty binary message: the same cause, no second error)
            await a.send(b"\x82\x01")
            assert "shorter" in (await recv_type(a, "error"))["message"]
            assert await no_picture(fa)
            with pytest.raises(ValueError, match="picture format 1"):
                P.unpack_frame(old)
            for ws in (a, b, fa):
                await ws.close()
    arun(body())


def test_the_call_program_gets_its_page_link_and_a_page_link_is_no_caller_link() -> None:
    async def body() -> None:
        async with run() as srv:
            sig = Signaling(srv.ws_url, "demo", srv.token("demo", "caller"), "caller")
            await sig.connect()
            page = sig.page_url()
            assert page is not None and page.startswith(srv.http_url + "/?")
            _, room, token = parse_join_url(page)
            assert (room, token, token.role) == ("demo", sig.face_token, "face")
            assert f"peer={sig.peer_id}" in page
            f, jf = await join_face(srv, sig.peer_id, token)
            assert jf["type"] == "joined"
            # the program learns its page is open
            async for msg in sig.messages():
                if isinstance(msg, dict) and msg.get("type") == "viewers" and sig.page_open():
                    break
            await f.close()
            await sig.close()
            # a page link given to streamer.call: said before joining
            with pytest.raises(SignalingError, match="face link"):
                parse_join_url(page, "caller")
    arun(body())
