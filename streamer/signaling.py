"""The websocket client of the call server's protocol (docs/protocol.md, version 2).

    sig = Signaling("ws://127.0.0.1:8765/ws", room="demo", token="...", role="sender")
    joined = await sig.connect()            # SignalingError on a bad token (or unknown room), ...
    async for msg in sig.messages():        # dicts for JSON, Picture for binary frames
        ...
    await sig.signal(peer_id, {"type": "offer", "sdp": ...})
    sig.offer_picture(KIND_DECODED, frame_number, ts_us, jpeg)   # latest-only, never blocks

Pictures go out through a latest-only slot per kind drained by a writer task, so a slow
socket thins pictures instead of delaying the call. Control messages are sent in order.

Each role has its own token (docs/protocol.md, "Roles and tokens"): the server prints one join
URL per role, `http://HOST:PORT/?room=R&token=T&role=ROLE`, and the sender needs the sender's,
the receiver the receiver's. `parse_join_url` keeps the URL's role on the token it returns
(`JoinToken.role`), so a `Signaling` given the viewers' link as a sender says so before joining.
A two-way call's two people both hold the `caller` link (role "caller", streamer.call). A
caller also gets its own page's token in `joined` (`face_token`): `page_url()` is the link of
the page that shows that person's call and steers this program (hang up, mute, bitrate).

Pictures are picture format 2 (server.protocol): each carries the peer id of its sender, stamped
by the server (`Picture.sender`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from server.protocol import (
    CLOSE_REPLACED,
    KIND_AUDIO,
    KIND_CAMERA,
    KIND_DECODED,
    KIND_ORIGINAL,
    WS_PATH,
    pack_frame,
    unpack_frame,
)

from .errors import StreamerError

__all__ = [
    "KIND_AUDIO",
    "KIND_CAMERA",
    "KIND_DECODED",
    "KIND_ORIGINAL",
    "JoinToken",
    "Picture",
    "Signaling",
    "SignalingError",
    "parse_join_url",
    "resolve_server",
]

DEFAULT_SERVER = "ws://127.0.0.1:8765/ws"
# the links the server prints, and a caller's page link ("face", printed by streamer.call)
URL_ROLES = ("caller", "sender", "receiver", "camera", "viewer", "face")
# The join role each link's token is for ("camera" is a viewer that may feed the sender;
# "caller" is either seat of a two-way call, streamer.call).
_JOIN_ROLE = {"caller": "caller", "sender": "sender", "receiver": "receiver", "camera": "viewer",
              "viewer": "viewer", "face": "face"}


class JoinToken(str):
    """A room token as a join URL gave it, remembering which role's link it came from."""

    role: str | None = None

    def __new__(cls, token: str, role: str | None = None) -> JoinToken:
        obj = super().__new__(cls, token)
        obj.role = role
        return obj


class SignalingError(StreamerError):
    """The call server is unreachable, refused us (bad token, unknown room) or went away."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Picture:
    kind: int
    frame_number: int
    timestamp_us: int
    jpeg: bytes  # the payload: JPEG for kinds 1-3, PCM for kind 4 (server.protocol.unpack_pcm)
    sender: str = ""  # the peer id of whoever sent it (stamped by the server)


def _check_role(link_role: str | None, role: str) -> None:
    """A link of another role is a clear error before joining, not a bad_token after."""
    if link_role is not None and _JOIN_ROLE.get(link_role) != role:
        label = "viewers" if role == "viewer" else role
        raise SignalingError(f"this join URL is the {link_role} link (role={link_role}), but "
                             f"this program joins as the {role}: use the link on the line "
                             f"'{label}:' the server printed (each role has its own token)",
                             "wrong_link")


def parse_join_url(url: str, role: str | None = None) -> tuple[str, str, JoinToken]:
    """`http://HOST:PORT/?room=R&token=T[&role=ROLE]` (a join URL the server printed) ->
    (ws URL, room, token). The token is a `JoinToken` whose `.role` is the URL's role= (None
    when absent). With `role` (the role we will join as), a link of another role is a
    SignalingError at once."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise SignalingError(f"not a join URL: {url!r} (expected http://HOST:PORT/?room=R&token=T)")
    q = parse_qs(parts.query)
    room, token = q.get("room", [""])[0], q.get("token", [""])[0]
    link_role = q.get("role", [None])[0]
    if not room or not token:
        raise SignalingError(f"the join URL {url!r} lacks room= or token=")
    if link_role is not None and link_role not in URL_ROLES:
        raise SignalingError(f"the join URL {url!r} names an unknown role={link_role!r}")
    if role is not None:
        _check_role(link_role, role)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}{WS_PATH}", room, JoinToken(token, link_role)


def resolve_server(server: str | None, room: str | None, token: str | None,
                   url: str | None, role: str | None = None) -> tuple[str, str, str]:
    """Merge --url with --server/--room/--token (explicit options win). `role`: as in
    `parse_join_url`."""
    ws, r, t = (parse_join_url(url, role) if url else (DEFAULT_SERVER, "", ""))
    ws, r, t = server or ws, room or r, token or t
    if not r or not t:
        raise SignalingError("say which call to join: --room and --token (the token of your "
                             "role), or --url JOIN_URL (the server prints one per role)")
    return ws, r, t


class Signaling:
    def __init__(self, server: str, room: str, token: str, role: str, name: str = "",
                 open_timeout: float = 5.0) -> None:
        self.server, self.room, self.token, self.role, self.name = server, room, token, role, name
        self.open_timeout = open_timeout
        self.ws: ClientConnection | None = None
        self.peer_id: str | None = None
        self.peers: list[dict[str, Any]] = []
        self.closed_reason: str | None = None
        self._pictures: dict[int, bytes] = {}
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.pictures_sent = 0
        self.pictures_dropped = 0
        self.errors: list[dict[str, Any]] = []
        self.face_token: str | None = None  # a caller's: its own page's token (joined)

    async def connect(self) -> dict[str, Any]:
        """Open the socket and join; returns the `joined` message or raises SignalingError."""
        _check_role(getattr(self.token, "role", None), self.role)
        try:
            self.ws = await asyncio.wait_for(
                connect(self.server, open_timeout=self.open_timeout, compression=None, max_size=4 * 2**20,
                        ping_interval=10, ping_timeout=20),
                self.open_timeout + 1)
        except InvalidURI as e:
            raise SignalingError(f"bad server URL {self.server!r}: {e}") from None
        except (OSError, TimeoutError, InvalidHandshake) as e:
            raise SignalingError(f"cannot reach the call server at {self.server}: {e or type(e).__name__}. "
                                 "Is `python -m server` running there?") from None
        join = {"type": "join", "room": self.room, "token": str(self.token), "role": self.role}
        if self.name:
            join["name"] = self.name
        try:
            await self.ws.send(json.dumps(join))
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), self.open_timeout))
        except (ConnectionClosed, TimeoutError, ValueError, TypeError) as e:
            raise SignalingError(f"the server at {self.server} did not answer our join: {e}") from None
        if reply.get("type") == "error":
            await self.close()
            hint = ""
            if reply.get("code") == "bad_token":
                hint = (f"; the {self.role} needs the token of the link the server printed for "
                        f"the {self.role}" if self.role != "viewer" else "")
            raise SignalingError(f"the server refused to join room {self.room!r}: {reply.get('message')} "
                                 f"({reply.get('code')}){hint}", reply.get("code"))
        if reply.get("type") != "joined":
            await self.close()
            raise SignalingError(f"unexpected first reply from the server: {str(reply)[:200]}")
        self.peer_id = reply.get("peer_id")
        self.peers = list(reply.get("peers", []))
        if isinstance(reply.get("face_token"), str):
            self.face_token = reply["face_token"]
        self._writer = asyncio.ensure_future(self._write_pictures())
        return reply

    def page_url(self) -> str | None:
        """The link of this caller's own page (http://HOST:PORT/?room=R&token=F&role=face&peer=P),
        None before joining or when the server gave no page token."""
        if self.face_token is None or self.peer_id is None:
            return None
        parts = urlsplit(self.server)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        query = urlencode({"room": self.room, "token": self.face_token, "role": "face",
                           "peer": self.peer_id})
        return f"{scheme}://{parts.netloc}/?{query}"

    def page_open(self) -> bool:
        """Whether this caller's page is connected (the server lists it with face_of)."""
        return any(p.get("face_of") == self.peer_id for p in self.peers)

    def peer_with_role(self, role: str) -> str | None:
        """The first peer of `role` other than ourselves (None: there is none)."""
        for p in self.peers:
            if p.get("role") == role and p.get("peer_id") != self.peer_id:
                return p.get("peer_id")
        return None

    async def messages(self) -> AsyncIterator[dict[str, Any] | Picture]:
        """Incoming messages until the socket closes; keeps `peers` up to date. Malformed
        messages are skipped. Ends normally on close; `closed_reason` says why."""
        assert self.ws is not None, "connect() first"
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    try:
                        h, jpeg = unpack_frame(raw)
                    except ValueError:
                        continue
                    yield Picture(h.kind, h.frame, h.timestamp_us, jpeg, h.sender)
                    continue
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                t = msg.get("type")
                if t == "peer_joined":
                    self.peers = [p for p in self.peers if p.get("peer_id") != msg.get("peer_id")
                                  and not (msg.get("role") in ("sender", "receiver") and p.get("role") == msg.get("role"))]
                    self.peers.append({k: msg.get(k) for k in ("peer_id", "role", "name")})
                elif t == "peer_left":
                    self.peers = [p for p in self.peers if p.get("peer_id") != msg.get("peer_id")]
                elif t == "viewers" and isinstance(msg.get("peers"), list):
                    # who watches, latest-only: replaces the viewers we knew
                    self.peers = [p for p in self.peers if p.get("role") != "viewer"] + [
                        {k: v.get(k) for k in ("peer_id", "role", "name", "face_of")}
                        for v in msg["peers"] if isinstance(v, dict)]
                elif t == "error":
                    self.errors.append(msg)
                yield msg
        except ConnectionClosed:
            pass
        code, reason = self.ws.close_code, self.ws.close_reason
        if code == CLOSE_REPLACED:
            self.closed_reason = f"another {self.role} joined room {self.room!r} and replaced this one"
        elif code is not None and code != 1006:
            self.closed_reason = f"the server closed the connection ({code} {reason or ''})".strip()
        else:
            self.closed_reason = "the connection to the server was lost"

    async def send_json(self, msg: dict[str, Any]) -> bool:
        """Send a control message; False (not an exception) when the socket is gone."""
        if self.ws is None:
            return False
        try:
            await self.ws.send(json.dumps(msg, separators=(",", ":")))
            return True
        except ConnectionClosed:
            return False

    async def signal(self, to: str, data: dict[str, Any]) -> bool:
        return await self.send_json({"type": "signal", "to": to, "data": data})

    async def send_stats(self, stats: dict[str, Any]) -> bool:
        return await self.send_json({"type": "stats", "stats": stats})

    def offer_picture(self, kind: int, frame_number: int, timestamp_us: int, jpeg: bytes) -> None:
        """Queue a picture for viewers; a newer picture of the same kind replaces an unsent one."""
        if kind in self._pictures:
            self.pictures_dropped += 1
        self._pictures[kind] = pack_frame(kind, frame_number, jpeg, timestamp_us)
        self._wake.set()

    async def _write_pictures(self) -> None:
        while self.ws is not None:
            await self._wake.wait()
            self._wake.clear()
            while self._pictures:
                kind = next(iter(self._pictures))
                data = self._pictures.pop(kind)
                try:
                    await self.ws.send(data)
                    self.pictures_sent += 1
                except ConnectionClosed:
                    return

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
            self._writer = None
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
