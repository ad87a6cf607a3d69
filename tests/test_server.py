"""The call server over real loopback sockets: joining, relaying, refusals, static files, and
fan-out to many viewers with one that stops reading."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server import protocol as P
from server.app import run_server

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"demo": "room-secret"}  # room → secret; each role's token derives from it


def arun(coro: Any, timeout: float = 60) -> Any:
    """Run one async test body (pytest-asyncio is not a dependency of this project)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def open_ws(srv: Any, **kwargs: Any) -> ClientConnection:
    return await connect(srv.ws_url, compression=None, max_size=P.WS_MAX_SIZE * 2, **kwargs)


async def join(srv: Any, role: str, room: str = "demo", token: str | None = None,
               **kwargs: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """Join as `role` with that role's own token (unless `token` says otherwise)."""
    token = srv.token(room, role) if token is None else token
    ws = await open_ws(srv, **kwargs)
    await ws.send(json.dumps({"type": "join", "room": room, "token": token, "role": role}))
    return ws, json.loads(await recv_text(ws))


async def recv_text(ws: ClientConnection, timeout: float = 5) -> str:
    """The next text message, skipping pictures."""
    while True:
        message = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(message, str):
            return message


async def recv_type(ws: ClientConnection, type_: str, timeout: float = 5) -> dict[str, Any]:
    while True:
        msg = json.loads(await recv_text(ws, timeout))
        if msg["type"] == type_:
            return msg


async def expect_refusal(ws: ClientConnection, code: str, close_code: int) -> dict[str, Any]:
    """A fatal error: one error message with `code`, then a close with `close_code`."""
    msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert msg["type"] == "error" and msg["code"] == code, msg
    assert msg["message"]
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == close_code and ws.close_reason == code
    return msg


# ---- joining and relaying ------------------------------------------------------------------


def test_join_signal_and_peer_events() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, j1 = await join(srv, "sender")
            assert j1["type"] == "joined" and j1["role"] == "sender" and j1["peers"] == []
            receiver, j2 = await join(srv, "receiver")
            assert j2["peers"] == [{"peer_id": j1["peer_id"], "role": "sender", "name": ""}]
            pj = await recv_type(sender, "peer_joined")
            assert pj["peer_id"] == j2["peer_id"] and pj["role"] == "receiver"

            offer = {"type": "offer", "sdp": "v=0 fake"}
            await sender.send(json.dumps({"type": "signal", "to": j2["peer_id"], "data": offer}))
            got = await recv_type(receiver, "signal")
            assert got == {"type": "signal", "from": j1["peer_id"], "data": offer}

            await receiver.send(json.dumps({"type": "signal", "to": "nobody", "data": {}}))
            err = await recv_type(receiver, "error")
            assert err["code"] == P.UNKNOWN_PEER  # not fatal: the socket stays usable
            await receiver.send(json.dumps({"type": "signal", "to": j1["peer_id"],
                                            "data": {"type": "answer", "sdp": "a"}}))
            assert (await recv_type(sender, "signal"))["data"]["type"] == "answer"

            await receiver.close()
            left = await recv_type(sender, "peer_left")
            assert left == {"type": "peer_left", "peer_id": j2["peer_id"], "role": "receiver"}
    arun(body())


def test_a_rejoining_sender_replaces_the_old_one() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            old, j_old = await join(srv, "sender")
            receiver, _ = await join(srv, "receiver")
            new, j_new = await join(srv, "sender")
            assert [p["role"] for p in j_new["peers"]] == ["receiver"]
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(old.recv(), 5)
            assert old.close_code == P.CLOSE_REPLACED and old.close_reason == "replaced"
            assert (await recv_type(receiver, "peer_left"))["peer_id"] == j_old["peer_id"]
            assert (await recv_type(receiver, "peer_joined"))["peer_id"] == j_new["peer_id"]
            assert [p.role for p in srv.rooms["demo"].peers.values()] == ["receiver", "sender"]
    arun(body())


def test_stats_reach_viewers_and_the_other_peer_and_late_viewers() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender")
            receiver, _ = await join(srv, "receiver")
            viewer, _ = await join(srv, "viewer")
            stats = {"fps": 30.0, "kbps": 123.4, "latency_ms": 80, "psnr": 31.2, "loss": 0.0}
            await receiver.send(json.dumps({"type": "stats", "stats": stats}))
            want = {"type": "stats", "from_role": "receiver", "stats": stats}
            assert await recv_type(viewer, "stats") == want
            assert await recv_type(sender, "stats") == want
            late, _ = await join(srv, "viewer")
            assert await recv_type(late, "stats") == want
            await viewer.send(json.dumps({"type": "stats", "stats": {}}))
            assert (await recv_type(viewer, "error"))["code"] == P.BAD_MESSAGE
    arun(body())


def test_pictures_are_routed_by_kind_and_role() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, js = await join(srv, "sender")
            receiver, jr = await join(srv, "receiver")
            viewer, _ = await join(srv, "viewer")
            decoded = P.pack_frame(P.KIND_DECODED, 7, b"\xff\xd8decoded", 1234)
            await receiver.send(decoded)
            # a sender field claiming someone else is overwritten with the real sender
            original = P.pack_frame(P.KIND_ORIGINAL, 7, b"\xff\xd8original", 1234, "deadbeef")
            await sender.send(original)
            got = {P.unpack_frame(m := await asyncio.wait_for(viewer.recv(), 5))[0].kind: m
                   for _ in range(2)}
            header, jpeg = P.unpack_frame(got[1])
            assert (header.frame, header.timestamp_us, jpeg) == (7, 1234, b"\xff\xd8decoded")
            assert header.sender == jr["peer_id"]  # stamped by the server
            header, jpeg = P.unpack_frame(got[2])
            assert (header.sender, jpeg) == (js["peer_id"], b"\xff\xd8original")

            # The wrong role for a kind, and a frame shorter than its header: one error each.
            await receiver.send(P.pack_frame(P.KIND_CAMERA, 1, b"x"))
            await receiver.send(P.pack_frame(P.KIND_CAMERA, 2, b"x"))
            assert "kind 3" in (await recv_type(receiver, "error"))["message"]
            await receiver.send(b"\x82\x01\x00")
            assert "header" in (await recv_type(receiver, "error"))["message"]
    arun(body())


def test_browser_camera_frames_reach_the_sender() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender")
            camera = srv.token("demo", "camera")  # viewers that may feed the camera
            viewer, jv = await join(srv, "viewer", token=camera)
            other, jo = await join(srv, "viewer", token=camera)
            assert jv["may_send_camera"] is True
            frame = P.pack_frame(P.KIND_CAMERA, 1, b"\xff\xd8cam")
            await other.send(frame)  # not the camera owner: dropped, told once
            assert (await recv_type(other, "error"))["code"] == P.BAD_MESSAGE

            await viewer.send(json.dumps({"type": "camera", "on": True}))
            assert await recv_type(sender, "camera") == {"type": "camera", "on": True,
                                                         "from": jv["peer_id"]}
            await viewer.send(frame)
            got = await asyncio.wait_for(sender.recv(), 5)
            while isinstance(got, str):
                got = await asyncio.wait_for(sender.recv(), 5)
            assert P.unpack_frame(got) == (P.FrameHeader(P.KIND_CAMERA, 1, P.unpack_frame(frame)[0].timestamp_us,
                                                         jv["peer_id"]), b"\xff\xd8cam")

            await other.send(json.dumps({"type": "camera", "on": True}))  # takes over
            taken = await recv_type(viewer, "camera")
            assert taken["on"] is False and taken["from"] == jo["peer_id"]
            assert (await recv_type(sender, "camera"))["from"] == jo["peer_id"]

            # A sender that (re)joins while a camera is on learns it at once.
            sender2, _ = await join(srv, "sender")
            assert (await recv_type(sender2, "camera"))["on"] is True
            await other.close()
            off = await recv_type(sender2, "camera")
            assert off == {"type": "camera", "on": False, "from": jo["peer_id"]}
    arun(body())


def test_the_camera_owners_microphone_reaches_the_sender_and_no_one_elses() -> None:
    import struct

    def chunk(n: int, samples: int = 960, rate: int = 48000) -> bytes:
        return P.pack_frame(P.KIND_AUDIO, n, P.pack_pcm(struct.pack(f"<{samples}h", *range(samples)), rate))

    async def next_binary(ws: ClientConnection, timeout: float = 5) -> bytes:
        while isinstance(m := await asyncio.wait_for(ws.recv(), timeout), str):
            pass
        return m

    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender")
            receiver, _ = await join(srv, "receiver")
            camera = srv.token("demo", "camera")
            owner, jo = await join(srv, "viewer", token=camera)
            other, _ = await join(srv, "viewer", token=camera)
            watcher, _ = await join(srv, "viewer")  # the view-only link
            await owner.send(chunk(0))  # not the camera's owner yet: refused, said once
            err = await recv_type(owner, "error")
            assert err["code"] == P.BAD_MESSAGE and "camera" in err["message"]
            await owner.send(json.dumps({"type": "camera", "on": True}))
            await recv_type(sender, "camera")
            for n in range(1, 6):
                await owner.send(chunk(n))
            heard = [P.unpack_frame(await next_binary(sender)) for _ in range(5)]
            assert [h.frame for h, _ in heard] == [1, 2, 3, 4, 5]  # in order, none lost
            assert {h.sender for h, _ in heard} == {jo["peer_id"]}
            assert P.unpack_pcm(heard[0][1]) == (48000, struct.pack("<960h", *range(960)))
            await owner.send(chunk(6, rate=12345))  # malformed: one bad_message, not forwarded
            assert "rate" in (await recv_type(owner, "error"))["message"]
            await other.send(chunk(7))  # a camera link that does not own the camera
            assert "camera" in (await recv_type(other, "error"))["message"]
            await watcher.send(chunk(8))  # the view-only link
            assert "only watches" in (await recv_type(watcher, "error"))["message"]
            for ws in (sender, receiver):  # a refused chunk reaches no one; none ever the receiver
                got = []
                with contextlib.suppress(asyncio.TimeoutError):
                    while True:
                        got.append(await asyncio.wait_for(ws.recv(), 0.3))
                assert not any(isinstance(m, bytes) for m in got), got
    arun(body())


async def quiet_for(ws: ClientConnection, seconds: float = 0.3) -> list[dict[str, Any]]:
    """The text messages that arrive within `seconds`."""
    got: list[dict[str, Any]] = []
    with contextlib.suppress(asyncio.TimeoutError):
        while True:
            got.append(json.loads(await recv_text(ws, seconds)))
    return got


def test_a_bitrate_target_reaches_only_the_sender_and_its_answer_the_asker() -> None:
    from streamer.ratecontrol import RateController
    from streamer.send import bitrate_answer

    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            page, jp = await join(srv, "viewer", token=srv.token("demo", "camera"))
            assert jp["may_set_bitrate"] is True
            await page.send(json.dumps({"type": "set_bitrate", "kbps": 150}))
            alone = await recv_type(page, "bitrate")  # no sender yet: the server says so
            assert alone["ok"] is False and "no sender" in alone["message"]

            sender, _ = await join(srv, "sender")
            receiver, _ = await join(srv, "receiver")
            watcher, jw = await join(srv, "viewer")
            assert jw["may_set_bitrate"] is False
            await page.send(json.dumps({"type": "set_bitrate", "kbps": 150}))
            ask = await recv_type(sender, "set_bitrate")
            assert ask == {"type": "set_bitrate", "kbps": 150, "from": jp["peer_id"]}
            # The sender's rate controller takes it; its answer goes to the asker alone.
            rate = RateController(300, 30, 9)
            await sender.send(json.dumps({"type": "bitrate", "to": ask["from"],
                                          **bitrate_answer(rate, ask["kbps"])}))
            answer = await recv_type(page, "bitrate")
            assert answer["ok"] is True and answer["target_kbps"] == 150 == rate.target_kbps
            refused = bitrate_answer(rate, 1e9)  # the sender checks again: it trusts nobody
            assert refused["ok"] is False and rate.target_kbps == 150 == refused["target_kbps"]
            # The receiver (the call's other end) may ask too; a fixed-level sender says no.
            await receiver.send(json.dumps({"type": "set_bitrate", "kbps": 500.5}))
            ask = await recv_type(sender, "set_bitrate")
            assert ask["kbps"] == 500.5 and ask["from"] != jp["peer_id"]
            await sender.send(json.dumps({"type": "bitrate", "to": ask["from"],
                                          **bitrate_answer(None, ask["kbps"])}))
            fixed = await recv_type(receiver, "bitrate")
            assert fixed["ok"] is False and "no rate control" in fixed["message"]
            for ws in (receiver, watcher):  # nobody else hears asks or answers
                assert not [m for m in await quiet_for(ws) if "bitrate" in m["type"]]
    arun(body())


@pytest.mark.parametrize("kbps, words", [
    ("150", "number"), (None, "number"), (True, "number"), ([150], "number"),
    (float("nan"), "number"), (float("inf"), "number"), (29.9, "30..5000"), (5001, "30..5000"),
    (-300, "30..5000"), (10 ** 400, "30..5000"),
])
def test_bad_bitrate_targets_are_refused_and_never_reach_the_sender(kbps: Any, words: str) -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender")
            page, _ = await join(srv, "viewer", token=srv.token("demo", "camera"))
            await page.send(json.dumps({"type": "set_bitrate", "kbps": kbps}))  # NaN: as JS never
            err = await recv_type(page, "error")
            assert err["code"] == P.BAD_MESSAGE and err["about"] == "set_bitrate", err
            assert words in err["message"], err
            assert not [m for m in await quiet_for(sender) if m["type"] == "set_bitrate"]
            await page.send(json.dumps({"type": "set_bitrate", "kbps": 100}))  # still joined
            assert (await recv_type(sender, "set_bitrate"))["kbps"] == 100
    arun(body())


def test_misplaced_messages_after_joining_are_reported_but_not_fatal() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender")
            viewer, _ = await join(srv, "viewer")
            cases = [
                (viewer, {"type": "signal", "to": "x", "data": {}}, "signaling"),
                (viewer, {"type": "dance"}, "unknown message type"),
                (viewer, {"type": "join", "room": "demo"}, "already joined"),
                (viewer, {"type": "camera", "on": "yes"}, "boolean"),
                (sender, {"type": "camera", "on": True}, "only viewers"),
                (sender, {"type": "signal", "to": 5, "data": {}}, "string to"),
                (sender, {"type": "stats", "stats": [1]}, "object stats"),
                (sender, {"type": "set_bitrate", "kbps": 100}, "its own target"),
                (viewer, {"type": "bitrate", "to": "x", "ok": True}, "only the sender"),
                (sender, {"type": "bitrate", "to": "x", "ok": "yes"}, "boolean ok"),
                (sender, {"type": "bitrate", "to": "x", "ok": True, "message": "m" * 201},
                 "at most"),
                (sender, {"no": "type"}, "string \"type\""),
            ]
            for ws, msg, words in cases:
                await ws.send(json.dumps(msg))
                err = await recv_type(ws, "error")
                assert err["code"] == P.BAD_MESSAGE and words in err["message"], (msg, err)
            assert len(srv.rooms["demo"].peers) == 2  # both still in the room
    arun(body())


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("join_msg, code", [
    ({"type": "join", "room": "demo", "token": "wrong", "role": "viewer"}, P.BAD_TOKEN),
    # an unknown room answers like a wrong token (test_server_security checks they match)
    ({"type": "join", "room": "nope", "token": "x", "role": "viewer"}, P.BAD_TOKEN),
    ({"type": "join", "room": "demo", "token": "room-secret", "role": "viewer"}, P.BAD_TOKEN),
    ({"type": "join", "room": "demo", "token": "x", "role": "admin"}, P.BAD_MESSAGE),
    ({"type": "join", "room": "demo", "role": "viewer"}, P.BAD_MESSAGE),
    ({"type": "signal", "to": "x", "data": {}}, P.NOT_JOINED),
    (["join"], P.BAD_MESSAGE),
])
def test_bad_joins_are_refused_with_their_reason(join_msg: Any, code: str) -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            ws = await open_ws(srv)
            await ws.send(json.dumps(join_msg))
            await expect_refusal(ws, code, P.CLOSE_POLICY)
            assert srv.rooms["demo"].peers == {}
    arun(body())


def test_bad_json_is_refused_before_and_after_joining() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            ws = await open_ws(srv)
            await ws.send("{not json")
            assert "JSON" in (await expect_refusal(ws, P.BAD_JSON, P.CLOSE_POLICY))["message"]
            ws, _ = await join(srv, "viewer")
            await ws.send("[1, 2")
            await expect_refusal(ws, P.BAD_JSON, P.CLOSE_POLICY)
    arun(body())


def test_oversized_messages_are_refused() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            ws = await open_ws(srv)
            await ws.send(json.dumps({"type": "join", "pad": "x" * P.MAX_TEXT_BYTES}))
            await expect_refusal(ws, P.TOO_LARGE, P.CLOSE_TOO_BIG)
            ws, _ = await join(srv, "receiver")
            await ws.send(P.pack_frame(P.KIND_DECODED, 1, b"\0" * P.MAX_BINARY_BYTES))
            await expect_refusal(ws, P.TOO_LARGE, P.CLOSE_TOO_BIG)
            ws, _ = await join(srv, "receiver")  # beyond what websockets itself accepts
            await ws.send(b"\x01" * (P.WS_MAX_SIZE + 1))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == P.CLOSE_TOO_BIG
    arun(body())


def test_too_many_viewers_are_refused() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS, max_viewers=2) as srv:
            await join(srv, "viewer")
            await join(srv, "viewer")
            ws = await open_ws(srv)
            await ws.send(json.dumps({"type": "join", "room": "demo",
                                      "token": srv.token("demo", "viewer"), "role": "viewer"}))
            await expect_refusal(ws, P.ROOM_FULL, P.CLOSE_POLICY)
            _, joined = await join(srv, "sender")  # call peers don't count as viewers
            assert joined["type"] == "joined"
    arun(body())


def test_origins() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS, allowed_origins=["http://example.test"]) as srv:
            ws = await open_ws(srv, origin="http://evil.example")
            msg = await expect_refusal(ws, P.BAD_ORIGIN, P.CLOSE_POLICY)
            assert "evil.example" in msg["message"]
            for origin in (srv.http_url, f"http://localhost:{srv.port}", "http://example.test"):
                _, joined = await join(srv, "viewer", origin=origin)
                assert joined["type"] == "joined", origin
            ws = await open_ws(srv, origin=f"http://127.0.0.1:{srv.port + 1}")  # other port
            await expect_refusal(ws, P.BAD_ORIGIN, P.CLOSE_POLICY)
    arun(body())


def test_silent_connections_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.app.JOIN_TIMEOUT_S", 0.3)

    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            ws = await open_ws(srv)
            await expect_refusal(ws, P.JOIN_TIMEOUT, P.CLOSE_POLICY)
    arun(body())


# ---- static files ---------------------------------------------------------------------------


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest(method, path, skip_accept_encoding=True)  # path sent exactly as given
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_static_files_and_content_types() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            def check() -> None:
                status, headers, page = http_get(srv.port, "/?room=demo&token=t&role=viewer")
                assert status == 200 and headers["content-type"].startswith("text/html")
                assert page == (ROOT / "client" / "index.html").read_bytes()
                assert "default-src 'self'" in headers["content-security-policy"]
                for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
                    status, headers, data = http_get(srv.port, "/" + name)
                    assert status == 200 and headers["content-type"].startswith(ctype), name
                    assert data == (ROOT / "client" / name).read_bytes()
                    assert headers["x-content-type-options"] == "nosniff"
                status, headers, data = http_get(srv.port, "/app.js", "HEAD")
                assert status == 200 and data == b""
                assert int(headers["content-length"]) == (ROOT / "client" / "app.js").stat().st_size
                assert http_get(srv.port, "/missing.js")[0] == 404
                assert http_get(srv.port, "/app.js", "DELETE")[0] == 405
                assert http_get(srv.port, "/ws")[0] != 200  # websocket only
            await asyncio.to_thread(check)
    arun(body())


@pytest.mark.parametrize("path", [
    "/../pyproject.toml", "/..%2fpyproject.toml", "/%2e%2e/pyproject.toml",
    "/%2E%2E%2Fpyproject.toml", "/sub/../../secret.txt", "/sub/%2e%2e/%2e%2e/secret.txt",
    "/..\\secret.txt", "/%5c..%5csecret.txt", "/link-out", "/linkdir/secret.txt",
    "/.hidden", "/%00index.html", "/%ff", "//etc/passwd", "/%2fetc%2fpasswd",
])
def test_static_files_cannot_escape_the_client_dir(tmp_path: Path, path: str) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("TOP SECRET")
    client = tmp_path / "client"
    (client / "sub").mkdir(parents=True)
    (client / "index.html").write_text("<!doctype html>ok")
    (client / "sub" / "page.html").write_text("inner")
    (client / ".hidden").write_text("dot")
    (client / "link-out").symlink_to(outside)
    (client / "linkdir").symlink_to(tmp_path)
    (client / "link-in").symlink_to(client / "sub" / "page.html")

    async def body() -> None:
        async with run_server(rooms=ROOMS, client_dir=client) as srv:
            def check() -> None:
                status, _, data = http_get(srv.port, path)
                assert status == 404 and b"SECRET" not in data and b"root:" not in data
                assert http_get(srv.port, "/sub/page.html")[2] == b"inner"
                assert http_get(srv.port, "/link-in")[2] == b"inner"  # inside: fine
                assert http_get(srv.port, "/sub/")[0] == 404  # a dir without index.html
            await asyncio.to_thread(check)
    arun(body())


# ---- fan-out --------------------------------------------------------------------------------


def test_fifty_viewers_keep_the_frame_rate_while_one_stops_reading() -> None:
    """A fake receiver publishes kind-1 frames at 30 fps to 50 reading viewers plus one that
    stops reading after joining; each reading viewer must still get ~30 fps."""
    fps, n_viewers, warmup, window = 30, 50, 1.0, 3.0
    payload = os.urandom(40_000)  # a 640×480 JPEG's size: the stalled socket fills quickly

    async def body() -> dict[str, Any]:
        async with run_server(rooms=ROOMS) as srv:
            viewers = [(await join(srv, "viewer"))[0] for _ in range(n_viewers)]
            publisher, _ = await join(srv, "receiver")  # last: it reads no peer_joined backlog
            # The stalled viewer: a small receive buffer (set before connecting, so the TCP
            # window stays small) and no reading at all once joined.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.connect(("127.0.0.1", srv.port))
            sock.setblocking(False)
            slow, _ = await join(srv, "viewer", sock=sock)
            slow.transport.pause_reading()
            counts = [0] * n_viewers
            stop = asyncio.Event()

            async def count(i: int, ws: ClientConnection) -> None:
                while not stop.is_set():
                    try:
                        m = await asyncio.wait_for(ws.recv(), 0.5)
                    except asyncio.TimeoutError:
                        continue
                    if isinstance(m, bytes) and t0 + warmup <= time.monotonic() < t0 + warmup + window:
                        counts[i] += 1

            t0 = time.monotonic()
            readers = [asyncio.ensure_future(count(i, ws)) for i, ws in enumerate(viewers)]
            sent, late = 0, 0.0
            while (now := time.monotonic()) < t0 + warmup + window + 0.3:
                await publisher.send(P.pack_frame(P.KIND_DECODED, sent, payload))
                sent += 1
                next_at = t0 + sent / fps
                late = max(late, now - next_at + 1 / fps)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            publish_s = time.monotonic() - t0
            stop.set()
            await asyncio.gather(*readers)
            # Once it reads again, the stalled viewer ends on the newest picture, not a backlog.
            slow.transport.resume_reading()
            last = -1
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    m = await asyncio.wait_for(slow.recv(), 1.0)
                    if isinstance(m, bytes):
                        last = P.unpack_frame(m)[0].frame
            room = srv.rooms["demo"]
            slow_peer = next(p for p in room.viewers() if p.ws.remote_address[1] ==
                             slow.local_address[1])
            return {"per_viewer_fps": sorted(c / window for c in counts),
                    "publisher_fps": sent / publish_s, "max_late_s": late,
                    "slow_sent": slow_peer.outbox.sent, "slow_dropped": slow_peer.outbox.dropped,
                    "published": sent, "slow_last_frame": last}

    r = arun(body(), timeout=50)
    fps_list = r["per_viewer_fps"]
    print(f"\nfan-out: {n_viewers} viewers, min {fps_list[0]:.1f} / median "
          f"{fps_list[len(fps_list) // 2]:.1f} fps; publisher {r['publisher_fps']:.1f} fps; "
          f"stalled viewer got {r['slow_sent']} of {r['published']} frames "
          f"({r['slow_dropped']} skipped)")
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / "server_fanout.json").write_text(json.dumps(r, indent=1))
    assert r["slow_dropped"] > 0 and r["slow_sent"] < r["published"] / 2  # it really stalled
    assert r["slow_last_frame"] == r["published"] - 1
    assert r["publisher_fps"] >= fps * 0.9
    assert fps_list[0] >= fps * 0.8, fps_list  # every reading viewer kept (nearly) 30 fps


# ---- command line ---------------------------------------------------------------------------


def test_cli_prints_one_join_url_per_role_and_stops_cleanly_on_sigint() -> None:
    from server.tokens import role_token

    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", "0", "--room", "demo",
                             "--secret", "tok"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        links: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while len(links) < 5 and time.monotonic() < deadline:
            words = proc.stdout.readline().split()  # type: ignore[union-attr]
            if len(words) >= 3 and words[0].endswith(":") and words[1].startswith("http://"):
                links[words[0][:-1]] = words[1]
                assert words[2].startswith("("), words  # each says what it is for
        assert set(links) == {"caller", "sender", "receiver", "camera", "viewers"}, links
        for label, url in links.items():
            role = label.rstrip("s") if label == "viewers" else label
            assert url.startswith("http://127.0.0.1:") and url.endswith(
                f"/?room=demo&token={role_token('tok', 'demo', role)}&role={role}"), url
        assert "tok" not in "".join(links.values()).replace("token=", "")  # the secret is not
        port = int(links["viewers"].split(":")[2].split("/")[0])
        assert http_get(port, "/")[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        proc.kill()
