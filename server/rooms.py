"""Rooms, peers and per-peer outboxes.

Every peer has an `Outbox` drained by its own writer task, so the code that routes a message
never awaits another peer's socket: a slow browser only delays (and thins) its own deliveries.
Pictures and stats go into latest-only slots (a newer one replaces an unsent older one); control
messages (joined, signal, peer_joined, ...) go into an ordered, bounded queue and are never
dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from .protocol import CLOSE_POLICY

log = logging.getLogger("server.rooms")

CONTROL_QUEUE_LIMIT = 256  # control messages a peer may lag behind before it is dropped


class Socket(Protocol):
    """The part of a websockets connection the writer needs (fakeable in tests)."""

    async def send(self, message: str | bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class Outbox:
    """Pending messages of one peer: an ordered control queue plus latest-only slots."""

    def __init__(self) -> None:
        self._control: deque[str | bytes] = deque()
        self._slots: dict[str, str | bytes] = {}
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

    def put_latest(self, slot: str, message: str | bytes) -> None:
        """Offer a message that only matters until a newer one of the same slot exists."""
        if self.closed:
            return
        if slot in self._slots:
            self.dropped += 1
        self._slots[slot] = message
        self._wakeup.set()

    async def next(self) -> str | bytes | None:
        """The next message to send (control first, then slots in insertion order); None once
        closed."""
        while not self.closed:
            if self._control:
                return self._control.popleft()
            if self._slots:
                slot = next(iter(self._slots))
                return self._slots.pop(slot)
            self._wakeup.clear()
            await self._wakeup.wait()
        return None

    def close(self) -> None:
        self.closed = True
        self._control.clear()
        self._slots.clear()
        self._wakeup.set()


@dataclass(eq=False)
class Peer:
    """One joined websocket connection."""

    ws: Socket
    room: "Room"
    role: str
    name: str = ""
    peer_id: str = field(default_factory=lambda: secrets.token_hex(4))
    outbox: Outbox = field(default_factory=Outbox)
    writer: asyncio.Task[None] | None = None
    received_frames: int = 0
    warned: set[str] = field(default_factory=set)  # error causes already reported once

    def describe(self) -> dict[str, str]:
        return {"peer_id": self.peer_id, "role": self.role, "name": self.name}

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
    """A call: at most one sender, one receiver, and up to `max_viewers` viewers."""

    def __init__(self, name: str, token: str, max_viewers: int = 64) -> None:
        self.name = name
        self.token = token
        self.max_viewers = max_viewers
        self.peers: dict[str, Peer] = {}
        self.camera_owner: str | None = None  # viewer whose webcam feeds the sender
        self.last_stats: dict[str, str] = {}  # role → last stats message, for late viewers

    def by_role(self, role: str) -> Peer | None:
        for peer in self.peers.values():
            if peer.role == role:
                return peer
        return None

    def viewers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == "viewer"]

    def others(self, peer: Peer) -> list[Peer]:
        return [p for p in self.peers.values() if p is not peer]

    def broadcast(self, message: dict[str, Any], exclude: Peer | None = None) -> None:
        for p in list(self.peers.values()):
            if p is not exclude:
                p.send_json(message)
