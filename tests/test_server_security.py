"""The call server under attack on loopback (security issue 12): role tokens, viewers that try
to disturb the call, and the smaller holes (long paths, deep JSON, room probing, foreign
origins with a wildcard listen address, shutdown with stalled viewers)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
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
from test_server import (
    ROOMS,
    arun,
    expect_refusal,
    http_get,
    join,
    open_ws,
    recv_text,
    recv_type,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server import protocol as P
from server.app import CallServer, ServerConfig, run_server
from server.tokens import CREDENTIALS, role_token

ROOT = Path(__file__).resolve().parents[1]


async def refused(srv: Any, role: str, token: str, room: str = "demo") -> dict[str, Any]:
    """Join with `token`; expect a fatal bad_token and return the error message."""
    ws = await open_ws(srv)
    await ws.send(json.dumps({"type": "join", "room": room, "token": token, "role": role}))
    msg = await expect_refusal(ws, P.BAD_TOKEN, P.CLOSE_POLICY)
    return {**msg, "close": (ws.close_code, ws.close_reason)}


async def still_open(ws: ClientConnection, seconds: float = 0.3) -> list[dict[str, Any]]:
    """Whatever text arrives within `seconds`; fails if the socket closes meanwhile."""
    got = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            m = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:
            break
        if isinstance(m, str):
            got.append(json.loads(m))
    return got


def stalled_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive window, for a peer that will stop reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def sync(ws: ClientConnection) -> None:
    """Wait until the server has handled everything `ws` sent before (it answers in order)."""
    await ws.send(json.dumps({"type": "ping-for-test"}))
    await recv_type(ws, "error", timeout=30)


# ---- roles and tokens -----------------------------------------------------------------------


def test_role_tokens_are_hmacs_of_the_room_secret() -> None:
    tokens = {role: role_token("s3cret", "demo", role) for role in CREDENTIALS}
    assert len(set(tokens.values())) == len(CREDENTIALS)  # one per role
    for role, token in tokens.items():
        want = hmac.new(b"s3cret", f"demo:{role}".encode(), hashlib.sha256).hexdigest()[:32]
        assert token == want and len(token) == 32
    assert role_token("s3cret", "other", "viewer") != tokens["viewer"]  # per room
    assert role_token("s3cret!", "demo", "viewer") != tokens["viewer"]  # per secret

    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            assert srv.token("demo", "sender") == role_token(ROOMS["demo"], "demo", "sender")
            url = srv.join_url("demo")  # the default is the link to share
            assert url.endswith(f"?room=demo&token={srv.token('demo', 'viewer')}&role=viewer")
            assert "role=sender" in srv.join_url("demo", "sender")
            with pytest.raises(ValueError):
                srv.token("demo", "admin")
    arun(body())


def test_a_viewers_token_cannot_join_as_sender_or_receiver() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, js = await join(srv, "sender")
            receiver, jr = await join(srv, "receiver")
            await recv_type(sender, "peer_joined")
            for token in (srv.token("demo", "viewer"), srv.token("demo", "camera"), ROOMS["demo"]):
                for role in P.CALL_ROLES:
                    await refused(srv, role, token)
            await refused(srv, "receiver", srv.token("demo", "sender"))  # not each other's
            await refused(srv, "viewer", srv.token("demo", "sender"))  # roles are exact
            # The call was not touched: nobody left, nobody was replaced, the offer still flows.
            assert await still_open(sender) == [] and await still_open(receiver) == []
            room = srv.rooms["demo"]
            assert room.by_role("sender").peer_id == js["peer_id"]
            assert room.by_role("receiver").peer_id == jr["peer_id"]
            await sender.send(json.dumps({"type": "signal", "to": jr["peer_id"],
                                          "data": {"type": "offer", "sdp": "real"}}))
            assert (await recv_type(receiver, "signal"))["data"]["sdp"] == "real"
    arun(body())


def test_a_second_sender_without_the_senders_token_is_refused_and_the_first_stays() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            first, j1 = await join(srv, "sender")
            receiver, jr = await join(srv, "receiver")
            await recv_type(first, "peer_joined")
            for token in ("", "guess", srv.token("demo", "viewer"), srv.token("demo", "receiver")):
                await refused(srv, "sender", token)
            assert await still_open(first) == [] and first.close_code is None
            assert srv.rooms["demo"].by_role("sender").peer_id == j1["peer_id"]
            await first.send(json.dumps({"type": "signal", "to": jr["peer_id"],
                                         "data": {"type": "offer", "sdp": "from the first"}}))
            got = await recv_type(receiver, "signal")
            assert got["from"] == j1["peer_id"] and got["data"]["sdp"] == "from the first"
            # With the sender's own token a restarted sender still replaces it at once.
            second, j2 = await join(srv, "sender")
            assert second and j2["type"] == "joined"
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(first.recv(), 5)
            assert first.close_code == P.CLOSE_REPLACED
    arun(body())


def test_unknown_room_and_bad_token_are_indistinguishable() -> None:
    async def body() -> None:
        async with run_server(rooms={"demo": "a", "other": "b"}) as srv:
            wrong_token = await refused(srv, "viewer", "f" * 32)
            no_room = await refused(srv, "viewer", "f" * 32, room="nope")
            # a token of another room, and a surrogate-laden room name: same answer
            foreign = await refused(srv, "viewer", srv.token("other", "viewer"))
            odd = await refused(srv, "viewer", "x", room="\ud800" * 3)
            assert wrong_token == no_room == foreign == odd
            assert wrong_token["code"] == P.BAD_TOKEN and "nope" not in json.dumps(no_room)
    arun(body())


# ---- viewers cannot disturb the call ----------------------------------------------------------


def test_a_viewers_camera_toggle_flood_does_not_reach_the_senders_queue() -> None:
    """20,000 camera on/off from one viewer while the sender is busy (not reading): the sender
    stays connected, gets a bounded number of camera messages, and the last one is the state."""
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender", sock=stalled_socket(srv.port))
            viewer, jv = await join(srv, "viewer", token=srv.token("demo", "camera"))
            sender.transport.pause_reading()  # a sender busy encoding
            t0 = time.monotonic()
            for k in range(20_000):
                await viewer.send(json.dumps({"type": "camera", "on": k % 2 == 0}))
            await sync(viewer)  # the server has routed all 20,000
            sender_peer = srv.rooms["demo"].by_role("sender")
            assert sender_peer is not None and not sender_peer.outbox.closed
            sender.transport.resume_reading()
            camera = [m for m in await still_open(sender, 1.0) if m["type"] == "camera"]
            assert sender.close_code is None
            # latest-only, at most every VIEWER_UPDATE_INTERVAL_S (0.1 s)
            assert 1 <= len(camera) <= 10 * (time.monotonic() - t0) + 2, len(camera)
            assert camera[-1] == {"type": "camera", "on": False, "from": jv["peer_id"]}
            await viewer.send(json.dumps({"type": "camera", "on": True}))  # and it still works
            assert (await recv_type(sender, "camera"))["on"] is True
    arun(body(), timeout=120)


def test_viewers_coming_and_going_in_a_loop_do_not_reach_the_senders_queue() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender", sock=stalled_socket(srv.port))
            watcher, jw = await join(srv, "viewer")
            assert jw["peers"] and all(p["role"] == "sender" for p in jw["peers"])
            sender.transport.pause_reading()
            t0 = time.monotonic()
            for _ in range(400):  # > the 256 control messages a peer may lag behind
                ws, joined = await join(srv, "viewer")
                assert [p["role"] for p in joined["peers"]] == ["sender"]  # not other viewers
                await ws.close()
            await asyncio.sleep(0.3)
            assert not srv.rooms["demo"].by_role("sender").outbox.closed
            sender.transport.resume_reading()
            got = await still_open(sender, 1.0)
            assert sender.close_code is None
            views = [m for m in got if m["type"] == "viewers"]
            assert not any(m["type"] in ("peer_joined", "peer_left") for m in got)
            assert 1 <= len(views) <= 10 * (time.monotonic() - t0) + 2, len(views)
            assert views[-1]["count"] == 1 and views[-1]["peers"][0]["peer_id"] == jw["peer_id"]
            assert await still_open(watcher, 0.2) == []  # viewers hear nothing of each other
    arun(body(), timeout=120)


def test_a_view_only_link_can_neither_feed_the_camera_nor_set_the_bitrate() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender")
            viewer, jv = await join(srv, "viewer")
            assert jv["may_send_camera"] is False and jv["may_set_bitrate"] is False
            await viewer.send(json.dumps({"type": "camera", "on": True}))
            err = await recv_type(viewer, "error")
            assert err["code"] == P.BAD_MESSAGE and "camera link" in err["message"]
            await viewer.send(json.dumps({"type": "set_bitrate", "kbps": 1000}))
            err = await recv_type(viewer, "error")
            assert err["code"] == P.BAD_MESSAGE and err["about"] == "set_bitrate"
            assert "only watches" in err["message"] and "camera link" in err["message"]
            # Nor can it answer in the sender's name.
            await viewer.send(json.dumps({"type": "bitrate", "to": jv["peer_id"], "ok": True,
                                          "target_kbps": 5, "message": "pwned"}))
            assert "only the sender" in (await recv_type(viewer, "error"))["message"]
            await viewer.send(P.pack_frame(P.KIND_CAMERA, 1, b"\xff\xd8cam"))
            await sync(viewer)
            assert srv.rooms["demo"].camera_owner is None
            got = []
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    got.append(await asyncio.wait_for(sender.recv(), 0.3))
            assert got and all(isinstance(m, str) and json.loads(m)["type"] == "viewers"
                               for m in got), got  # no camera state, frame or bitrate ask
            # And the call goes on around it.
            await sender.send(json.dumps({"type": "stats", "stats": {"kbps": 301.0}}))
            assert (await recv_type(viewer, "stats"))["stats"] == {"kbps": 301.0}
    arun(body())


def test_a_bitrate_flood_reaches_a_busy_sender_as_its_latest_value() -> None:
    """2,000 set_bitrate from a camera page while the sender is not reading: latest-only, at
    most every VIEWER_UPDATE_INTERVAL_S, like the camera state; the sender stays connected."""
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            sender, _ = await join(srv, "sender", sock=stalled_socket(srv.port))
            page, _ = await join(srv, "viewer", token=srv.token("demo", "camera"))
            sender.transport.pause_reading()
            t0 = time.monotonic()
            for k in range(2_000):
                await page.send(json.dumps({"type": "set_bitrate", "kbps": 100 + k}))
            await sync(page)
            sender.transport.resume_reading()
            asks = [m for m in await still_open(sender, 1.0) if m["type"] == "set_bitrate"]
            assert sender.close_code is None
            assert 1 <= len(asks) <= 10 * (time.monotonic() - t0) + 2, len(asks)
            assert asks[-1]["kbps"] == 2_099
    arun(body(), timeout=120)


# ---- the smaller items -----------------------------------------------------------------------


def test_overlong_paths_are_refused_not_a_500() -> None:
    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            def check() -> None:
                status, _, data = http_get(srv.port, "/" + "a" * 4000)  # 4,001 characters
                assert status in (404, 414) and b"Traceback" not in data
                # under the length limit, but a file name the file system refuses (> 255)
                status, _, _ = http_get(srv.port, "/" + "b" * 300)
                assert status == 404
                assert http_get(srv.port, "/app.js")[0] == 200  # and the server is fine
            await asyncio.to_thread(check)
    arun(body())


@pytest.mark.parametrize("depth", [40, 990, 5000, 100_000 // 2 // 2])
def test_deeply_nested_json_is_bad_json(depth: int) -> None:
    nested = "[" * depth + "]" * depth

    async def body() -> None:
        async with run_server(rooms=ROOMS) as srv:
            ws = await open_ws(srv)
            await ws.send(nested)  # before joining
            await expect_refusal(ws, P.BAD_JSON, P.CLOSE_POLICY)
            ws, _ = await join(srv, "receiver")  # after joining, inside a stats message
            await ws.send('{"type":"stats","stats":{"x":' + nested + "}}")
            await expect_refusal(ws, P.BAD_JSON, P.CLOSE_POLICY)
            ws, _ = await join(srv, "receiver")  # shallow nesting is fine
            viewer, _ = await join(srv, "viewer")
            await ws.send(json.dumps({"type": "stats", "stats": {"a": [[[[{"b": 1}]]]]}}))
            assert (await recv_type(viewer, "stats"))["stats"] == {"a": [[[[{"b": 1}]]]]}
    arun(body())


def test_a_foreign_host_and_origin_pair_is_refused_on_every_interface() -> None:
    """`--host 0.0.0.0`: the Host header is not trusted (DNS rebinding sends a matching pair).
    Tested by config on 127.0.0.1: no traffic leaves loopback."""
    app = CallServer(ServerConfig(rooms=ROOMS, host="0.0.0.0", port=8765))
    # a page of another site that resolved its name to us
    assert not app.origin_allowed("http://evil.example:8765", "192.0.2.7")
    # our own pages: loopback names, and the address the connection arrived on
    assert app.origin_allowed("http://192.0.2.7:8765", "192.0.2.7")
    assert app.origin_allowed("http://192.0.2.7:8765", "::ffff:192.0.2.7")
    assert app.origin_allowed("http://[2001:db8::1]:8765", "2001:db8::1")
    assert app.origin_allowed("http://localhost:8765", "127.0.0.1")
    assert not app.origin_allowed("http://192.0.2.8:8765", "192.0.2.7")  # another machine
    assert not app.origin_allowed("http://192.0.2.7:8766", "192.0.2.7")  # another port
    assert not app.origin_allowed("https://192.0.2.7:8765", "192.0.2.7")

    async def body() -> None:
        async with run_server(rooms=ROOMS, allowed_origins=["http://ok.example"]) as srv:
            srv.app.config.host = "0.0.0.0"  # what --host 0.0.0.0 sets
            foreign = f"evil.example:{srv.port}"
            for origin, ok in ((f"http://{foreign}", False), (srv.http_url, True),
                               ("http://ok.example", True)):
                sock = socket.create_connection(("127.0.0.1", srv.port))  # loopback only
                # Host: evil.example:PORT and Origin: http://evil.example:PORT, as a rebinding
                # attack sends them
                ws = await connect(f"ws://{foreign}/ws", sock=sock, origin=origin)
                if ok:
                    await ws.send(json.dumps({"type": "join", "room": "demo", "role": "viewer",
                                              "token": srv.token("demo", "viewer")}))
                    assert json.loads(await recv_text(ws))["type"] == "joined", origin
                else:
                    await expect_refusal(ws, P.BAD_ORIGIN, P.CLOSE_POLICY)
    arun(body())


def test_shutdown_with_stalled_viewers_is_quick() -> None:
    """Viewers that never read fill their sockets; closing the server must not wait for them
    (it took 15-20 s): it ends well within 3 s, and their connections are gone."""
    payload = os.urandom(40_000)

    async def body() -> float:
        async with run_server(rooms=ROOMS) as srv:
            publisher, _ = await join(srv, "receiver")
            stalled = []
            for _ in range(12):
                ws, _ = await join(srv, "viewer", sock=stalled_socket(srv.port))
                ws.transport.pause_reading()
                stalled.append(ws)
            reader, _ = await join(srv, "viewer")

            async def read() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await reader.recv()
            reading = asyncio.ensure_future(read())
            for n in range(45):
                await publisher.send(P.pack_frame(P.KIND_DECODED, n, payload))
                await asyncio.sleep(1 / 30)
            assert any(p.outbox.dropped for p in srv.rooms["demo"].viewers())  # really stalled
            t0 = time.monotonic()
        took = time.monotonic() - t0
        await asyncio.wait_for(reading, 5)
        assert reader.close_code == P.CLOSE_GOING_AWAY  # a reading peer got a clean close
        for ws in stalled:  # the stalled ones were cut off
            ws.transport.resume_reading()
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
        return took

    took = arun(body())
    assert took < 3.0, f"shutdown took {took:.1f} s"


# ---- a real call under a viewer's flood ---------------------------------------------------------


FLOODER = """
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(url, token):
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "join", "room": "test", "token": token, "role": "viewer"}))
        assert json.loads(await ws.recv())["type"] == "joined"
        for k in range(20_000):
            await ws.send(json.dumps({"type": "camera", "on": k % 2 == 0}))
        await ws.send(json.dumps({"type": "ping-for-test"}))  # answered once all are routed
        while True:
            m = await ws.recv()
            if isinstance(m, str) and json.loads(m)["type"] == "error":
                break

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_real_call_keeps_its_frame_rate_while_a_viewer_floods_camera_toggles() -> None:
    """streamer.send and streamer.receive in a call at 5 fps through `python -m server`; a
    viewer process with the camera link sends 20,000 camera on/off. Before the fix the server
    closed the sender ("too slow") and the call stayed at 0 fps; now the sender stays and the
    receiver keeps its frame rate."""
    from test_call import Running, wait_until

    from streamer import receive, send

    server = subprocess.Popen([sys.executable, "-m", "server", "--port", "0", "--room", "test",
                               "--secret", "room-secret"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("server listening on 127.0.0.1:"), line
        ws_url = f"ws://{line.split()[-1]}/ws"

        def common(role: str) -> list[str]:
            return ["--server", ws_url, "--room", "test", "--token",
                    role_token("room-secret", "test", role), "--ice-address", "127.0.0.1",
                    "--quiet"]

        async def shown_in(rx: Running, seconds: float) -> float:
            start = rx.obj.shown
            await asyncio.sleep(seconds)
            return (rx.obj.shown - start) / seconds

        async def main() -> dict[str, Any]:
            rx = Running(receive, common("receiver"))
            await wait_until(lambda: rx.obj is not None, 60)
            tx = Running(send, common("sender") + ["--source", "synthetic", "--fps", "5"])
            await wait_until(lambda: rx.obj.shown >= 10, 60)
            r = {"before": await shown_in(rx, 4.0)}
            flood = subprocess.Popen([sys.executable, "-c", FLOODER, ws_url,
                                      role_token("room-secret", "test", "camera")], cwd=ROOT)
            r["during"] = await shown_in(rx, 3.0)
            r["flood_rc"] = await asyncio.to_thread(flood.wait, 60)
            r["after"] = await shown_in(rx, 3.0)
            r["sender_stayed"] = not tx.task.done()
            r["sender_closed_reason"] = tx.obj.sig.closed_reason
            await tx.finish()
            await rx.finish()
            return r

        r = asyncio.run(main())
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"\ncall under a camera-toggle flood: {r}")
    assert r["flood_rc"] == 0 and r["sender_stayed"], r
    assert r["before"] >= 3 and r["after"] >= 0.8 * r["before"], r
    assert r["during"] >= 0.5 * r["before"], r  # the flood's CPU shares two cores with the call
