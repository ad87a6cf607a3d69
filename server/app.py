"""The call server: static client files and the room websocket on one port.

In-process use (tests, demos)::

    async with run_server(host="127.0.0.1", port=0, rooms={"demo": "the room's secret"}) as srv:
        print(srv.join_url("demo"))            # the viewers' link: it only watches
        print(srv.join_url("demo", "sender"))  # http://127.0.0.1:PORT/?room=demo&token=...&role=sender
        srv.token("demo", "receiver")          # a role's token (server.tokens.role_token)

or, from synchronous code, ``with serve_in_thread(rooms={...}) as srv: ...``.
The protocol is specified in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol as P
from . import tokens
from .rooms import (
    CALL_ROLES,
    CALLER,
    FACE,
    JOIN_ROLES,
    MAX_CALLERS,
    VIEWER_UPDATE_INTERVAL_S,
    Peer,
    Room,
)
from .static import default_client_dir, serve_file

log = logging.getLogger("server")

JOIN_TIMEOUT_S = 10.0
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MAX_JSON_DEPTH = 32  # control messages are shallow; deeper nesting is refused as bad_json
CAMERA_MAX_FPS = 60.0  # kind-3 frames passed on to the sender per second, at most
AUDIO_QUEUE_CHUNKS = 25  # a page's microphone chunks waiting for its program, at most (0.5 s)
PEER_ID_DIGITS = 8  # server.rooms.Peer ids: secrets.token_hex(4)
WATCH_ONLY = ("this link only watches: a caller's own page (the link its streamer.call "
              "prints) steers that call")
SHUTDOWN_GRACE_S = 0.5  # how long a clean close may take at shutdown before the socket is cut
BAD_TOKEN_MESSAGE = ("wrong room or token for this role (use the join URL the server printed "
                     "for it: the viewers' link only watches)")


class Refusal(Exception):
    """A fatal refusal: an error message with `code`, then a close with `close_code`."""

    def __init__(self, code: str, message: str, close_code: int = P.CLOSE_POLICY) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


@dataclass
class ServerConfig:
    """What a server serves and how much it accepts."""

    rooms: dict[str, str]  # room name → the room's secret (role tokens derive from it)
    host: str = "127.0.0.1"
    port: int = 8765
    max_viewers: int = 64
    client_dir: Path = field(default_factory=default_client_dir)
    # Extra origins a browser page may connect from; same-origin pages always may.
    allowed_origins: Sequence[str] = ()


class CallServer:
    """Routes messages between the peers of each room. One instance per listening server."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.rooms: dict[str, Room] = {
            name: Room(name, secret, config.max_viewers) for name, secret in config.rooms.items()}
        self.port = config.port  # the real port once listening (config may say 0)
        # An unknown room is checked against this, so that it costs what a known one costs and
        # answers the same bad_token.
        self._decoy_secret = tokens.new_secret()
        self.connections: set[ServerConnection] = set()
        self.closing = False

    # ---- HTTP ---------------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Let websocket upgrades of /ws through; answer every other request with a file."""
        if urlsplit(request.path).path == P.WS_PATH:
            return None
        return serve_file(self.config.client_dir, getattr(request, "method", "GET"), request.path)

    # ---- origins ------------------------------------------------------------------------

    def origin_allowed(self, origin: str | None, local_address: str | None = None) -> bool:
        """Python peers send no Origin; a browser must come from a page of this server.

        Same-origin means `http://NAME:PORT` where NAME is a loopback name, the host the server
        was told to listen on (when it is not a wildcard), or the address of this machine the
        connection arrived on (`local_address`: a LAN page opened as http://192.168.1.5:PORT
        connects to 192.168.1.5). The Host header is never trusted: with DNS rebinding a foreign
        page sends a matching Host/Origin pair. Other names need --allow-origin.
        """
        if origin is None:
            return True
        if origin in self.config.allowed_origins:
            return True
        hosts = set(_LOOPBACK_NAMES)
        if self.config.host not in _WILDCARD_HOSTS:
            hosts.add(self.config.host)
        if local_address:
            hosts.add(_plain_address(local_address))
        netlocs = {f"[{h}]" if ":" in h else h for h in hosts}
        allowed = {f"http://{n}:{self.port}" for n in netlocs}
        if self.port == 80:
            allowed |= {f"http://{n}" for n in netlocs}
        return origin in allowed

    # ---- websocket ----------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        """One connection: check origin, wait for `join`, then route its messages."""
        peer: Peer | None = None
        self.connections.add(ws)
        try:
            if self.closing:
                await ws.close(P.CLOSE_GOING_AWAY, "server shutting down")
                return
            headers = ws.request.headers if ws.request else {}
            sockname = ws.transport.get_extra_info("sockname") if ws.transport else None
            local = sockname[0] if isinstance(sockname, tuple) and sockname else None
            if not self.origin_allowed(headers.get("Origin"), local):
                raise Refusal(P.BAD_ORIGIN, f"origin {headers.get('Origin')!r} may not connect "
                              "to this server (open the page from the server's own URL)")
            try:
                first = await asyncio.wait_for(ws.recv(), JOIN_TIMEOUT_S)
            except asyncio.TimeoutError:  # (not the builtin before 3.11)
                raise Refusal(P.JOIN_TIMEOUT, f"no join message within {JOIN_TIMEOUT_S:g} s") from None
            peer = self._join(ws, first)
            async for message in ws:
                self._route(peer, message)
        except Refusal as refusal:
            await self._refuse(ws, peer, refusal)
        except ConnectionClosed:
            pass
        except Exception:  # a bug here must not take the server down, only this connection
            log.exception("connection handler failed")
            await ws.close(1011, "internal error")
        finally:
            self.connections.discard(ws)
            if peer is not None:
                self._leave(peer)

    async def _refuse(self, ws: ServerConnection, peer: Peer | None, refusal: Refusal) -> None:
        text = json.dumps({"type": "error", "code": refusal.code, "message": refusal.message})
        log.info("refusing connection: %s: %s", refusal.code, refusal.message)
        if peer is not None:
            # Stop the writer so the error is the last message and nothing races the close.
            peer.outbox.close()
            if peer.writer:
                peer.writer.cancel()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)
            await ws.close(refusal.close_code, refusal.code)

    def _join(self, ws: ServerConnection, message: str | bytes) -> Peer:
        msg = self._parse(message)
        if msg.get("type") != "join":
            raise Refusal(P.NOT_JOINED, "the first message must be "
                          '{"type":"join","room":...,"token":...,"role":...}')
        room_name, token, role = msg.get("room"), msg.get("token"), msg.get("role")
        name = msg.get("name", "")
        if not isinstance(room_name, str) or not isinstance(token, str):
            raise Refusal(P.BAD_MESSAGE, "join needs string fields room and token")
        if role not in JOIN_ROLES:
            raise Refusal(P.BAD_MESSAGE, f"role must be one of {', '.join(JOIN_ROLES)}")
        if not isinstance(name, str) or len(name) > 64:
            raise Refusal(P.BAD_MESSAGE, "name must be a string of at most 64 characters")
        room = self.rooms.get(room_name)
        # The token must be the one of the role asked for. A viewer may hold the view-only
        # token or the camera one. An unknown room is checked against a decoy secret: the same
        # work and the same answer, so a guess cannot tell which rooms exist.
        secret = room.secret if room is not None else self._decoy_secret
        face_of = msg.get("peer") if role == FACE else None
        if role == FACE:
            # a caller's page: the token its program got in `joined`, for that program's peer id
            if not (isinstance(face_of, str) and len(face_of) == PEER_ID_DIGITS
                    and all(c in "0123456789abcdef" for c in face_of)):
                raise Refusal(P.BAD_MESSAGE, "a face join needs peer: the peer id (8 hex digits) "
                              "of its call program (the page link streamer.call prints has it)")
            valid = [tokens.face_matches(secret, room_name, face_of, token)]
        else:
            credentials = ("viewer", "camera") if role == "viewer" else (role,)
            valid = [tokens.matches(secret, room_name, c, token) for c in credentials]
        if room is None or not any(valid):
            raise Refusal(P.BAD_TOKEN, BAD_TOKEN_MESSAGE)
        if role == FACE:
            program = room.peers.get(face_of)
            if program is None or program.role != CALLER:
                raise Refusal(P.UNKNOWN_PEER, "the call program this page belongs to is not in "
                              "the room (it ended?): start streamer.call again and open the page "
                              "link it prints")
        if role == "viewer" and len(room.viewers()) >= room.max_viewers:
            raise Refusal(P.ROOM_FULL, f"room {room_name!r} already has {room.max_viewers} viewers")
        if role == CALLER and len(room.callers()) >= MAX_CALLERS:
            # (not a replacement: both callers hold the same token, so a newcomer cannot be told
            # from a third person; a caller that restarts gets its seat back once its old socket
            # is gone: at once when the program exits or is killed, after the websocket ping timeout when
            # its machine or network went away)
            raise Refusal(P.ROOM_FULL, f"room {room_name!r} already has its {MAX_CALLERS} callers: "
                          "this call is full")

        joined_role = role
        if role == FACE:
            role = "viewer"  # it watches like a viewer; face_of is what it may steer
        peer = Peer(ws=ws, room=room, role=role, name=name,
                    may_camera=role == "viewer" and face_of is None and valid[1], face_of=face_of)
        if role == "viewer":
            _limit_send_buffer(ws)
        if face_of is not None and (old_face := room.face(face_of)) is not None:
            # one page per program: the newest (a reload, another tab) takes over
            self._leave(old_face)
            old_face.outbox.close()
            asyncio.ensure_future(old_face.ws.close(P.CLOSE_REPLACED, "replaced"))
        if role in P.CALL_ROLES and (old := room.by_role(role)) is not None:  # (callers: above)
            # A restarted sender/receiver must get back in at once: the newcomer wins (it holds
            # this role's token, so it is the same party).
            self._leave(old)
            old.outbox.close()
            asyncio.ensure_future(old.ws.close(P.CLOSE_REPLACED, "replaced"))
            log.info("room %s: %s %s replaced by %s", room.name, role, old.peer_id, peer.peer_id)
        # Viewers learn who is in the call, not who else watches.
        visible = room.peers.values() if role in CALL_ROLES else room.call_peers()
        others = [p.describe() for p in visible]
        room.peers[peer.peer_id] = peer
        peer.start_writer()
        joined: dict[str, Any] = {"type": "joined", "peer_id": peer.peer_id, "room": room.name,
                                  "role": joined_role, "peers": others}
        if role == "viewer":
            joined["may_send_camera"] = peer.may_camera or face_of is not None
            joined["may_set_bitrate"] = _may_set_bitrate(peer)
        if face_of is not None:
            joined["face_of"] = face_of
        if role == CALLER:  # for its own page only (the other caller never sees it)
            joined["face_token"] = tokens.face_token(room.secret, room.name, peer.peer_id)
        peer.send_json(joined)
        if role == "viewer":
            room.viewers_changed()  # to the call peers, latest-only
            for from_role, stats in room.last_stats.items():  # don't wait a second for numbers
                peer.outbox.put_latest(f"stats:{from_role}", stats)
        else:
            room.broadcast({"type": "peer_joined", **peer.describe()}, exclude=peer)
        if role == "sender" and room.camera_owner is not None:
            peer.outbox.put_latest("camera", _camera_text(True, room.camera_owner),
                                   VIEWER_UPDATE_INTERVAL_S)
        log.info("room %s: %s %s joined (%s)", room.name, role, peer.peer_id, name or "-")
        return peer

    def _leave(self, peer: Peer) -> None:
        room = peer.room
        if room.peers.get(peer.peer_id) is not peer:
            return  # already replaced or removed
        del room.peers[peer.peer_id]
        peer.outbox.close()
        if peer.role == CALLER:
            room.last_stats.pop(_stats_key(peer), None)
        if peer.role == "viewer":
            room.viewers_changed()
        else:
            room.broadcast({"type": "peer_left", "peer_id": peer.peer_id, "role": peer.role})
        if room.camera_owner == peer.peer_id:
            room.camera_owner = None
            if (sender := room.by_role("sender")) is not None:
                sender.outbox.put_latest("camera", _camera_text(False, peer.peer_id),
                                         VIEWER_UPDATE_INTERVAL_S)
        log.info("room %s: %s %s left", room.name, peer.role, peer.peer_id)

    def _parse(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, bytes):
            raise Refusal(P.NOT_JOINED, "join with a JSON text message before sending pictures")
        if len(message) > P.MAX_TEXT_BYTES:  # chars ≤ bytes: a cheap first check
            raise Refusal(P.TOO_LARGE, f"control messages are limited to {P.MAX_TEXT_BYTES} "
                          "bytes", P.CLOSE_TOO_BIG)
        if len(message.encode()) > P.MAX_TEXT_BYTES:
            raise Refusal(P.TOO_LARGE, f"control messages are limited to {P.MAX_TEXT_BYTES} "
                          "bytes", P.CLOSE_TOO_BIG)
        try:
            msg = json.loads(message)
        except ValueError as exc:
            raise Refusal(P.BAD_JSON, f"not valid JSON: {exc}") from None
        except RecursionError:  # nested deeper than the interpreter's stack allows
            too_deep = True
        else:
            too_deep = _too_deep(msg, MAX_JSON_DEPTH)
        if too_deep:
            raise Refusal(P.BAD_JSON, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise Refusal(P.BAD_MESSAGE, 'a control message is a JSON object with a string "type"')
        return msg

    # ---- routing after join -------------------------------------------------------------

    def _error(self, peer: Peer, code: str, message: str, **extra: str) -> None:
        """A non-fatal error: the peer stays connected. `extra`: e.g. about="set_bitrate", so
        a page can show the error next to the control that caused it."""
        peer.send_json({"type": "error", "code": code, "message": message, **extra})

    def _route(self, peer: Peer, message: str | bytes) -> None:
        if peer.room.peers.get(peer.peer_id) is not peer:
            raise ConnectionClosed(None, None)  # replaced while a message was in flight
        if isinstance(message, bytes):
            self._route_picture(peer, message)
            return
        try:
            msg = self._parse(message)
        except Refusal as refusal:
            if refusal.code == P.BAD_MESSAGE:  # well-formed JSON of a shape we don't know
                self._error(peer, refusal.code, refusal.message)
                return
            raise
        kind = msg["type"]
        room = peer.room
        if kind == "signal":
            if peer.role == "viewer":
                return self._error(peer, P.BAD_MESSAGE, "viewers do not take part in WebRTC "
                                   "signaling")
            to, data = msg.get("to"), msg.get("data")
            if not isinstance(to, str) or not isinstance(data, dict):
                return self._error(peer, P.BAD_MESSAGE, "signal needs a string to and an "
                                   "object data")
            target = room.peers.get(to)
            if target is None:
                return self._error(peer, P.UNKNOWN_PEER, f"no peer {to[:16]!r} in this room")
            target.send_json({"type": "signal", "from": peer.peer_id, "data": data})
        elif kind == "stats":
            if peer.role == "viewer":
                return self._error(peer, P.BAD_MESSAGE, "only the peers of the call send stats")
            stats = msg.get("stats")
            if not isinstance(stats, dict):
                return self._error(peer, P.BAD_MESSAGE, "stats needs an object stats")
            out: dict[str, Any] = {"type": "stats", "from_role": peer.role, "stats": stats}
            if peer.role == CALLER:  # two of them: say which
                out["from"] = peer.peer_id
            text = json.dumps(out, separators=(",", ":"))
            key = _stats_key(peer)
            room.last_stats[key] = text
            for other in room.others(peer):  # viewers and the other call peer(s)
                other.outbox.put_latest(f"stats:{key}", text)
        elif kind == "camera":
            if peer.role != "viewer":
                return self._error(peer, P.BAD_MESSAGE, "only viewers offer their camera")
            on = msg.get("on")
            if not isinstance(on, bool):
                return self._error(peer, P.BAD_MESSAGE, "camera needs a boolean on")
            self._camera(peer, on)
        elif kind == "set_bitrate":
            self._set_bitrate(peer, msg.get("kbps"))
        elif kind == "hangup":
            if (program := self._program_of(peer, kind)) is not None:
                program.outbox.put_latest("hangup", json.dumps(
                    {"type": "hangup", "from": peer.peer_id}, separators=(",", ":")))
        elif kind == "mute":
            camera, microphone = msg.get("camera"), msg.get("microphone")
            if not (isinstance(camera, bool) and isinstance(microphone, bool)):
                return self._error(peer, P.BAD_MESSAGE, "mute needs booleans camera and "
                                   "microphone (the whole state)", about="mute")
            if (program := self._program_of(peer, kind)) is not None:
                # latest-only, at most every 0.1 s: a toggled button costs the program the
                # current state, never a backlog
                program.outbox.put_latest("mute", json.dumps(
                    {"type": "mute", "camera": camera, "microphone": microphone,
                     "from": peer.peer_id}, separators=(",", ":")), VIEWER_UPDATE_INTERVAL_S)
        elif kind == "bitrate":
            self._bitrate_answer(peer, msg)
        elif kind == "join":
            self._error(peer, P.BAD_MESSAGE, "already joined")
        else:
            self._error(peer, P.BAD_MESSAGE, f"unknown message type {kind[:32]!r}")

    def _program_of(self, peer: Peer, about: str) -> Peer | None:
        """The call program a caller's page steers (None, and one error, when this peer is no
        such page or its program has left)."""
        if peer.face_of is None:
            self._error(peer, P.BAD_MESSAGE, WATCH_ONLY, about=about)
            return None
        program = peer.room.peers.get(peer.face_of)
        if program is None:
            self._error(peer, P.UNKNOWN_PEER, "your call program has left the room: the call "
                        "is over", about=about)
        return program

    def _within_rate(self, peer: Peer, key: str, per_second: float) -> bool:
        """At most `per_second` messages of `key` in each one-second window (a window, not a
        minimum gap: a page's timer jitter may bunch two chunks, which must still pass)."""
        now = asyncio.get_running_loop().time()
        start, count = peer.rates.get(key, (now, 0))
        if now - start >= 1.0:
            start, count = now, 0
        if count >= per_second:
            peer.rates[key] = (start, count)
            return False
        peer.rates[key] = (start, count + 1)
        return True

    def _camera(self, peer: Peer, on: bool) -> None:
        room = peer.room
        if not peer.may_camera:
            return self._error_once(peer, "camera-right", P.BAD_MESSAGE, "this viewer link "
                                    "only watches: the camera link the server printed may "
                                    "feed the call's camera")
        sender = room.by_role("sender")
        if on:
            previous = room.camera_owner
            room.camera_owner = peer.peer_id
            if previous is not None and previous != peer.peer_id and previous in room.peers:
                # One camera feeds the call: the latest volunteer takes over.
                room.peers[previous].outbox.put_latest("camera", _camera_text(
                    False, peer.peer_id, reason="taken over"), VIEWER_UPDATE_INTERVAL_S)
        elif room.camera_owner == peer.peer_id:
            room.camera_owner = None
        else:
            return
        if sender is not None:
            # Latest-only: a viewer toggling its camera in a loop sends the sender the current
            # state, never a backlog that could overflow its ordered queue.
            sender.outbox.put_latest("camera", _camera_text(on, peer.peer_id),
                                     VIEWER_UPDATE_INTERVAL_S)

    def _set_bitrate(self, peer: Peer, kbps: object) -> None:
        """Someone in the call asks the sender for another bitrate target (its --kbps)."""
        if not _may_set_bitrate(peer):
            why = ("the sender sets its own target (--kbps)" if peer.role == "sender" else
                   "this viewer link only watches: the camera link the server printed may "
                   "change the bitrate")
            return self._error(peer, P.BAD_MESSAGE, why, about="set_bitrate")
        if (problem := P.bitrate_error(kbps)) is not None:
            return self._error(peer, P.BAD_MESSAGE, problem, about="set_bitrate")
        # a caller's page asks its own program (its person's picture); a caller asks the other
        # caller (who sends it the picture); the others, the sender
        if peer.face_of is not None:
            sender = peer.room.peers.get(peer.face_of)
        elif peer.role == CALLER:
            sender = peer.room.other_caller(peer)
        else:
            sender = peer.room.by_role("sender")
        if sender is None:
            return peer.outbox.put_latest("bitrate", _bitrate_text(
                False, None, "no sender in the call: nothing to set"))
        # Latest-only, at most every 0.1 s: a slider dragged across its range (or a loop) costs
        # the sender ten small messages a second, never a backlog in its ordered queue.
        text = json.dumps({"type": "set_bitrate", "kbps": kbps, "from": peer.peer_id},
                          separators=(",", ":"))
        sender.outbox.put_latest("set_bitrate", text, VIEWER_UPDATE_INTERVAL_S)

    def _bitrate_answer(self, peer: Peer, msg: dict[str, Any]) -> None:
        """The sender's answer to a set_bitrate, to the one who asked (latest-only)."""
        if peer.role not in ("sender", CALLER):
            return self._error(peer, P.BAD_MESSAGE, "only the sender answers set_bitrate")
        to, ok, target, text = (msg.get("to"), msg.get("ok"), msg.get("target_kbps"),
                                msg.get("message", ""))
        if not (isinstance(to, str) and isinstance(ok, bool) and _is_kbps_or_none(target)
                and isinstance(text, str) and len(text) <= P.BITRATE_MESSAGE_CHARS):
            return self._error(peer, P.BAD_MESSAGE, "bitrate needs a string to, a boolean ok, "
                               "a positive target_kbps or null, and a message of at most "
                               f"{P.BITRATE_MESSAGE_CHARS} characters")
        if (asker := peer.room.peers.get(to)) is not None:  # else it left meanwhile
            asker.outbox.put_latest("bitrate", _bitrate_text(ok, target, text))

    def _route_picture(self, peer: Peer, message: bytes) -> None:
        if len(message) > P.MAX_BINARY_BYTES:
            raise Refusal(P.TOO_LARGE, f"pictures are limited to {P.MAX_BINARY_BYTES} bytes",
                          P.CLOSE_TOO_BIG)
        if (problem := P.picture_format_error(message)) is not None:
            # one error per cause: the old format, not a picture, too short
            first = message[0] if message else -1
            cause = "format1" if first in P.OLD_HEADER_KINDS else \
                "short" if first == P.PICTURE_FORMAT else "format"
            return self._error_once(peer, cause, P.BAD_MESSAGE, problem)
        kind = message[1]
        room = peer.room
        peer.received_frames += 1
        # Whoever sent it, as the server knows it: a page tells the two callers' pictures apart
        # by this, and no client can claim another's pictures.
        message = message[:P.SENDER_SLICE.start] + P.sender_bytes(peer.peer_id) + \
            message[P.SENDER_SLICE.stop:]
        if kind == P.KIND_DECODED and peer.role == "receiver" or \
                kind == P.KIND_ORIGINAL and peer.role == "sender" or \
                kind in (P.KIND_DECODED, P.KIND_ORIGINAL) and peer.role == CALLER:
            # a caller is both ends (it shows the other's picture and sends its own): one
            # latest-only slot per caller, so one caller's pictures never replace the other's
            slot = f"{kind}:{peer.peer_id}" if peer.role == CALLER else str(kind)
            for viewer in room.viewers():
                viewer.outbox.put_latest(slot, message)
        elif kind in (P.KIND_CAMERA, P.KIND_AUDIO) and peer.face_of is not None:
            # a caller's page feeds its own program only (--source browser)
            if (program := room.peers.get(peer.face_of)) is None:
                return self._error_once(peer, "no-program", P.UNKNOWN_PEER, "your call program "
                                        "has left the room: the call is over")
            if kind == P.KIND_CAMERA:
                if self._within_rate(peer, "camera", CAMERA_MAX_FPS):
                    program.outbox.put_latest(str(kind), message)
                return
            self._forward_pcm(peer, message, program)
        elif kind == P.KIND_CAMERA and peer.role == "viewer":
            if room.camera_owner != peer.peer_id:
                return self._error_once(peer, "camera", P.BAD_MESSAGE, 'send {"type":"camera",'
                                        '"on":true} before camera frames')
            now = asyncio.get_running_loop().time()
            if now - peer.last_camera_frame < 1.0 / CAMERA_MAX_FPS:
                return  # faster than any camera: thinned here, before it costs the sender
            peer.last_camera_frame = now
            if (sender := room.by_role("sender")) is not None:
                sender.outbox.put_latest(str(kind), message)
        elif kind == P.KIND_AUDIO and peer.role == "viewer":
            # the camera link's page sends its microphone with its camera (--source browser)
            if room.camera_owner != peer.peer_id:
                return self._error_once(peer, "kind4", P.BAD_MESSAGE, WATCH_ONLY if not peer.may_camera
                                        else 'a camera link sends its microphone only while it feeds the '
                                        'camera (send {"type":"camera","on":true} first); until then it only watches')
            self._forward_pcm(peer, message, room.by_role("sender"))
        else:
            self._error_once(peer, f"kind{kind}", P.BAD_MESSAGE,
                             f"a {peer.role} may not send pictures of kind {kind}")

    def _forward_pcm(self, peer: Peer, message: bytes, to: Peer | None) -> None:
        """A microphone chunk (kind 4), checked and rate-limited, into `to`'s ordered audio queue."""
        try:
            P.unpack_pcm(message[P.HEADER_SIZE:])
        except ValueError as exc:
            return self._error_once(peer, "pcm", P.BAD_MESSAGE, str(exc))
        if self._within_rate(peer, "audio", P.AUDIO_MAX_CHUNKS_PER_S) and to is not None:
            to.outbox.put_stream("audio", message, AUDIO_QUEUE_CHUNKS)

    def _error_once(self, peer: Peer, key: str, code: str, message: str) -> None:
        # Pictures arrive at 30 fps: one error per cause is enough, not one per frame.
        if key not in peer.warned:
            peer.warned.add(key)
            self._error(peer, code, message)


    # ---- shutdown -----------------------------------------------------------------------

    async def shutdown(self, server: Server) -> None:
        """Close every connection at once. A peer that stopped reading cannot take a close
        frame (its socket buffers are full), so it is cut off instead of waited for; the others
        get a clean 1001 close, and whatever has not closed after SHUTDOWN_GRACE_S is cut too."""
        self.closing = True
        for room in self.rooms.values():
            for peer in list(room.peers.values()):
                peer.outbox.close()
                if peer.writer is not None:
                    peer.writer.cancel()
        for ws in list(self.connections):
            transport = ws.transport
            if transport is not None and transport.get_write_buffer_size() > 0:
                transport.abort()
        server.close(code=P.CLOSE_GOING_AWAY, reason="server shutting down")
        try:
            await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE_S)
        except asyncio.TimeoutError:
            for ws in list(self.connections):
                if ws.transport is not None:
                    ws.transport.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)


def _camera_text(on: bool, owner: str, **extra: str) -> str:
    return json.dumps({"type": "camera", "on": on, "from": owner, **extra}, separators=(",", ":"))


def _may_set_bitrate(peer: Peer) -> bool:
    """The other end of the call (the receiver, or a caller of a two-way call: it asks the
    other caller) and a page holding the camera link take part in the call and may change its
    bitrate; the viewers' link only watches."""
    return peer.role in ("receiver", CALLER) or peer.may_camera or peer.face_of is not None


def _stats_key(peer: Peer) -> str:
    """Whose last stats a late viewer gets: per role, per caller for the two callers."""
    return f"{CALLER}:{peer.peer_id}" if peer.role == CALLER else peer.role


def _is_kbps_or_none(value: object) -> bool:
    # A sender's own target may lie outside what a page may set (--kbps goes to 100000).
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and 0 < value < 1e7)


def _bitrate_text(ok: bool, target_kbps: float | None, message: str) -> str:
    return json.dumps({"type": "bitrate", "ok": ok, "target_kbps": target_kbps,
                       "message": message}, separators=(",", ":"))


def _plain_address(address: str) -> str:
    """An IP as an origin names it: IPv4-mapped IPv6 as IPv4, no zone."""
    address = address.split("%", 1)[0]
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip)
    return address


def _too_deep(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests containers deeper than `limit` (iterative)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return False


VIEWER_SNDBUF = 256 * 1024


def _limit_send_buffer(ws: ServerConnection) -> None:
    """Cap the kernel's send buffer of a viewer socket. Autotuning lets it grow to megabytes,
    which a stalled viewer would fill with seconds-old pictures; with a small buffer the
    latest-only slot does the waiting, so a viewer that recovers sees a fresh picture."""
    sock = ws.transport.get_extra_info("socket") if ws.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, VIEWER_SNDBUF)


@dataclass
class RunningServer:
    """Handle of a listening server (what `run_server` yields)."""

    app: CallServer
    server: Server
    host: str
    port: int

    @property
    def rooms(self) -> dict[str, Room]:
        return self.app.rooms

    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return "ws" + self.http_url[4:] + P.WS_PATH

    def token(self, room: str, role: str = "viewer") -> str:
        """The token of a credential of `room`: "caller", "sender", "receiver", "camera" or
        "viewer"."""
        if role not in tokens.CREDENTIALS:
            raise ValueError(f"role must be one of {', '.join(tokens.CREDENTIALS)}, not {role!r}")
        return self.app.rooms[room].token(role)

    def join_url(self, room: str, role: str = "viewer") -> str:
        """The join URL of one credential of `room`. "viewer" (the default) is the link to
        share: a browser that opens it watches the call. "camera" is a viewer that may also feed
        the sender's `--source browser`; "sender" and "receiver" are for `streamer.send` /
        `streamer.receive --url` and grant those seats; "caller" is for `streamer.call --url`
        (both people of a two-way call hold it: two seats)."""
        query = urlencode({"room": room, "token": self.token(room, role), "role": role})
        return f"{self.http_url}/?{query}"

    def close(self) -> None:
        self.server.close()


@contextlib.asynccontextmanager
async def run_server(host: str = "127.0.0.1", port: int = 0,
                     rooms: Mapping[str, str] | None = None, *, max_viewers: int = 64,
                     client_dir: Path | None = None,
                     allowed_origins: Sequence[str] = ()) -> AsyncIterator[RunningServer]:
    """Listen on host:port (0 = any free port) until the block exits."""
    config = ServerConfig(rooms=dict(rooms or {}), host=host, port=port,
                          max_viewers=max_viewers, allowed_origins=tuple(allowed_origins))
    if client_dir is not None:
        config.client_dir = Path(client_dir)
    if not (config.client_dir / "index.html").is_file():
        log.warning("no browser client at %s: pages will 404 (pass client_dir / --client-dir)",
                    config.client_dir)
    app = CallServer(config)
    # compression=None: JPEGs don't shrink, and deflate per viewer would cost CPU the call needs.
    async with serve(app.handler, host, port, process_request=app.process_request,
                     compression=None, max_size=P.WS_MAX_SIZE, max_queue=64,
                     close_timeout=3,  # a stalled viewer must not hold up shutdown for long
                     logger=logging.getLogger("server.ws")) as server:
        sock = next(iter(server.sockets))
        app.port = sock.getsockname()[1]
        try:
            yield RunningServer(app=app, server=server, host=host, port=app.port)
        finally:
            await app.shutdown(server)


@contextlib.contextmanager
def serve_in_thread(host: str = "127.0.0.1", port: int = 0,
                    rooms: Mapping[str, str] | None = None,
                    **kwargs: Any) -> Iterator[RunningServer]:
    """`run_server` on a background event loop, for synchronous callers (browser tests)."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        state["stop"] = stop
        state["loop"] = asyncio.get_running_loop()
        try:
            async with run_server(host, port, rooms, **kwargs) as srv:
                state["srv"] = srv
                started.set()
                await stop.wait()
        except BaseException as exc:  # report start-up failures to the caller
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="call-server",
                              daemon=True)
    thread.start()
    started.wait(30)
    if "error" in state:
        raise state["error"]
    try:
        yield state["srv"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(15)
