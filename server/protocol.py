"""Wire constants and helpers of the server protocol (docs/protocol.md, version 1).

Kept free of server state so that test clients and the call's peers can import them: the binary
picture header, the error codes and which of them end the connection.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

PROTOCOL_VERSION = 1
WS_PATH = "/ws"

MAX_TEXT_BYTES = 64 * 1024  # control messages (JSON)
MAX_BINARY_BYTES = 2 * 1024 * 1024  # one JPEG picture with its header
# websockets' own limit sits above ours so that we, not the library, answer an oversized message
# with a `too_large` error before closing.
WS_MAX_SIZE = MAX_BINARY_BYTES + 64 * 1024

# Binary picture kinds.
KIND_DECODED = 1  # receiver → viewers
KIND_ORIGINAL = 2  # sender → viewers
KIND_CAMERA = 3  # viewer → sender

ROLES = ("sender", "receiver", "viewer")  # what a join may ask to be
CALL_ROLES = ("sender", "receiver")  # the call's seats (one peer each); viewers only watch

# A bitrate target a page (or the receiver) may ask the sender for (`set_bitrate`): wide enough
# for any call, narrow enough that a typo cannot starve the call or flood the link.
BITRATE_MIN_KBPS = 30.0
BITRATE_MAX_KBPS = 5000.0
BITRATE_MESSAGE_CHARS = 200  # the sender's answer text, at most

_HEADER = struct.Struct(">BIQ")
HEADER_SIZE = _HEADER.size  # 13 bytes

# Close codes.
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001  # the server shuts down
CLOSE_REPLACED = 4000

# Error codes (the `code` field of an error message).
BAD_TOKEN = "bad_token"  # also for an unknown room: a guess must not tell which rooms exist
UNKNOWN_ROOM = "unknown_room"  # no longer sent (kept for clients that still name it)
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
TOO_LARGE = "too_large"
ROOM_FULL = "room_full"
BAD_ORIGIN = "bad_origin"
NOT_JOINED = "not_joined"
UNKNOWN_PEER = "unknown_peer"  # not fatal: a signal to a peer that is not (or no longer) there
JOIN_TIMEOUT = "join_timeout"


def bitrate_error(kbps: object) -> str | None:
    """Why `kbps` is not a bitrate target that may be set (None: it is one). The server and
    the sender both check, so a sender never trusts what reached it."""
    # (an int is compared as is: JSON's may be too large for a float)
    if isinstance(kbps, bool) or not isinstance(kbps, (int, float)) or \
            isinstance(kbps, float) and not math.isfinite(kbps):
        return f"kbps must be a finite number, got {str(kbps)[:32]!r}"
    if not BITRATE_MIN_KBPS <= kbps <= BITRATE_MAX_KBPS:
        return f"kbps must be in {BITRATE_MIN_KBPS:g}..{BITRATE_MAX_KBPS:g}, got {str(kbps)[:32]}"
    return None


@dataclass(frozen=True)
class FrameHeader:
    """The 13-byte header in front of every binary picture."""

    kind: int
    frame: int
    timestamp_us: int


def now_us() -> int:
    """Capture timestamps are µs since the Unix epoch, so a browser on the same machine can
    compare them with Date.now()."""
    return time.time_ns() // 1000


def pack_frame(kind: int, frame: int, jpeg: bytes, timestamp_us: int | None = None) -> bytes:
    """Build one binary picture message: header + JPEG bytes."""
    ts = now_us() if timestamp_us is None else timestamp_us
    return _HEADER.pack(kind, frame & 0xFFFFFFFF, ts & 0xFFFFFFFFFFFFFFFF) + jpeg


def unpack_frame(message: bytes) -> tuple[FrameHeader, bytes]:
    """Split a binary picture message into its header and JPEG payload.

    Raises ValueError when the message is shorter than the header.
    """
    if len(message) < HEADER_SIZE:
        raise ValueError(f"binary message of {len(message)} bytes is shorter than the "
                         f"{HEADER_SIZE}-byte picture header")
    kind, frame, ts = _HEADER.unpack_from(message)
    return FrameHeader(kind, frame, ts), bytes(message[HEADER_SIZE:])
