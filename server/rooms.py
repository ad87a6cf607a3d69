"""Rooms, peers and per-peer outboxes.

Every peer has an `Outbox` drained by its own writer task, so the code that routes a message
never awaits another peer's socket: a slow browser only delays (and thins) its own deliveries.
Pictures, stats, camera state, bitrate asks and answers and the viewer list go into latest-only
slots (a newer one replaces an unsent older one); control messages (joined, signal, the call
peers' peer_joined / peer_left, errors) go into an ordered, bounded queue and are never dropped.
Nothing a viewer does puts anything into a call peer's ordered queue, so no viewer can make it
overflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from . import tokens
from .protocol import CALL_ROLES as ONE_WAY_ROLES
from .protocol import CLOSE_POLICY
from .protocol import ROLES as ONE_WAY_JOIN_ROLES

log = logging.getLogger("server.rooms")

# A two-way call's seats (streamer.call): two peers of role "caller", both holding the room's
# caller token; a third is refused (room_full). The first caller in the room offers.
CALLER = "caller"
MAX_CALLERS = 2
# A caller's own page joins as "face" with the face token its program got (server.tokens); in the
# room it is a viewer (it watches like one) that may also steer that one program.
FACE = "face"
# What a join may ask to be, and the roles that take part in the call (WebRTC, stats; viewers
# only watch). "sender" and "receiver" are one peer each: a newcomer replaces the old one.
JOIN_ROLES = ONE_WAY_JOIN_ROLES + (CALLER, FACE)
CALL_ROLES = ONE_WAY_ROLES + (CALLER,)

CONTROL_QUEUE_LIMIT = 256  # control messages a peer may lag behind before it is dropped
# What viewers cause at a call peer (camera state, the viewer list) is latest-only and at most
# this often per slot: a viewer looping its camera button or reconnecting costs a caller ten
# small messages a second, whatever its socket buffers would take.
VIEWER_UPDATE_INTERVAL_S = 0.1


class Socket(Protocol):
    """The part of a websockets connection the writer needs (fakeable in tests)."""

    async def send(self, message: str | bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


# A slot holds a message, or a function that builds it when the writer gets to it (the viewer
# list: rebuilt once per send, not once per change).
SlotMessage = Union[str, bytes, Callable[[], str]]


class Outbox:
    """Pending messages of one peer: an ordered control queue plus latest-only slots."""

    def __init__(self) -> None:
        self._control: deque[str | bytes] = deque()
        self._slots: dict[str, SlotMessage] = {}
        self._intervals: dict[str, float] = {}  # slot → least time between two sends
        self._not_before: dict[str, float] = {}  # slot → loop time of its next allowed send
        # streams: in order, bounded, oldest dropped (a page's microphone chunks: every one
        # counts, but a stalled program must not make them pile up)
        self._streams: dict[str, deque[str | bytes]] = {}
        self._wakeup = asyncio.Event()
        self.closed = False
        self.sent = 0
        self.dropped = 0  # slot contents overwritten before they could be sent

    def put_control(self, message: str | bytes) -> bool:
        """Queue a message that must arrive; False when the peer lags too far behind."""
        if self.closed:
            return True
        if len(self._control) >= CONTROL_QUEUE_LIMIT:
            return False
        self._control.append(message)
        self._wakeup.set()
        return True

    def put_latest(self, slot: str, message: SlotMessage, min_interval: float = 0.0) -> None:
        """Offer a message that only matters until a newer one of the same slot exists; with
        `min_interval`, the slot is also sent at most that often (a newer message waits)."""
        if self.closed:
            return
        if slot in self._slots:
            self.dropped += 1
        self._slots[slot] = message
        if min_interval:
            self._intervals[slot] = min_interval
        self._wakeup.set()

    def put_stream(self, key: str, message: str | bytes, limit: int) -> None:
        """Queue a message of an ordered stream that keeps at most `limit` unsent (the oldest
        goes, counted in `dropped`)."""
        if self.closed:
            return
        queue = self._streams.setdefault(key, deque())
        if len(queue) >= limit:
            queue.popleft()
            self.dropped += 1
        queue.append(message)
        self._wakeup.set()

    async def next(self) -> str | bytes | None:
        """The next message to send (control first, then streams, then slots in insertion
        order, each when its interval allows); None once closed."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            if self._control:
                return self._control.popleft()
            for queue in self._streams.values():
                if queue:
                    return queue.popleft()
            now, wait = loop.time(), None
            for slot in self._slots:
                not_before = self._not_before.get(slot, 0.0)
                if not_before <= now:
                    message = self._slots.pop(slot)
                    if slot in self._intervals:
                        self._not_before[slot] = now + self._intervals[slot]
                    return message() if callable(message) else message
                wait = not_before - now if wait is None else min(wait, not_before - now)
            self._wakeup.clear()
            if wait is None:
                await self._wakeup.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
        return None

    def close(self) -> None:
        self.closed = True
        self._control.clear()
        self._slots.clear()
        self._streams.clear()
        self._wakeup.set()


@dataclass(eq=False)
class Peer:
    """One joined websocket connection."""

    ws: Socket
    room: Room
    role: str
    name: str = ""
    peer_id: str = field(default_factory=lambda: secrets.token_hex(4))
    outbox: Outbox = field(default_factory=Outbox)
    writer: asyncio.Task[None] | None = None
    may_camera: bool = False  # a viewer that joined with the camera credential
    face_of: str | None = None  # a caller's own page (a viewer that steers that caller program)
    received_frames: int = 0
    last_camera_frame: float = 0.0  # loop time of the last kind-3 frame passed on
    warned: set[str] = field(default_factory=set)  # error causes already reported once
    rates: dict[str, tuple[float, int]] = field(default_factory=dict)  # key → (window start, count)

    def describe(self) -> dict[str, str]:
        out = {"peer_id": self.peer_id, "role": self.role, "name": self.name}
        if self.face_of is not None:
            out["face_of"] = self.face_of  # (its program learns its page is open)
        return out

    def send_json(self, message: dict[str, Any]) -> None:
        """Queue a control message; a peer that cannot keep up even with those is dropped."""
        if not self.outbox.put_control(json.dumps(message, separators=(",", ":"))):
            log.warning("peer %s lags %d control messages behind; closing it",
                        self.peer_id, CONTROL_QUEUE_LIMIT)
            self.outbox.close()
            asyncio.ensure_future(self.ws.close(CLOSE_POLICY, "too slow"))

    def start_writer(self) -> None:
        self.writer = asyncio.ensure_future(self._write_loop())

    async def _write_loop(self) -> None:
        # The only place that awaits this peer's socket: backpressure stays here.
        try:
            while (message := await self.outbox.next()) is not None:
                await self.ws.send(message)
                self.outbox.sent += 1
        except Exception as exc:  # connection closed under us: the reader side cleans up
            log.debug("writer of %s stopped: %r", self.peer_id, exc)


class Room:
    """A call: at most one sender and one receiver (one way) or two callers (two-way), and up
    to `max_viewers` viewers."""

    def __init__(self, name: str, secret: str, max_viewers: int = 64) -> None:
        self.name = name
        self.secret = secret  # never sent anywhere: participants hold role tokens
        self.max_viewers = max_viewers
        self.peers: dict[str, Peer] = {}
        self.camera_owner: str | None = None  # viewer whose webcam feeds the sender
        self.last_stats: dict[str, str] = {}  # role → last stats message, for late viewers
        self._viewers_text: str | None = None  # cached `viewers` message

    def token(self, role: str) -> str:
        """The token of a credential ("caller", "sender", "receiver", "camera", "viewer")."""
        return tokens.role_token(self.secret, self.name, role)

    def by_role(self, role: str) -> Peer | None:
        for peer in self.peers.values():
            if peer.role == role:
                return peer
        return None

    def callers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == CALLER]

    def other_caller(self, peer: Peer) -> Peer | None:
        return next((p for p in self.callers() if p is not peer), None)

    def face(self, caller_id: str) -> Peer | None:
        """The page of caller `caller_id` (at most one: a newer one replaces it)."""
        return next((p for p in self.peers.values() if p.face_of == caller_id), None)

    def viewers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == "viewer"]

    def others(self, peer: Peer) -> list[Peer]:
        return [p for p in self.peers.values() if p is not peer]

    def call_peers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role in CALL_ROLES]

    def broadcast(self, message: dict[str, Any], exclude: Peer | None = None) -> None:
        for p in list(self.peers.values()):
            if p is not exclude:
                p.send_json(message)

    def viewers_changed(self) -> None:
        """Tell the call peers who watches, latest-only: a viewer joining and leaving in a
        loop costs them one message per send, never a queue entry per change."""
        self._viewers_text = None
        for p in self.call_peers():
            p.outbox.put_latest("viewers", self._viewers_message, VIEWER_UPDATE_INTERVAL_S)

    def _viewers_message(self) -> str:
        if self._viewers_text is None:
            self._viewers_text = json.dumps(
                {"type": "viewers", "count": len(self.viewers()),
                 "peers": [v.describe() for v in self.viewers()]}, separators=(",", ":"))
        return self._viewers_text
