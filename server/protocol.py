"""Wire constants and helpers of the server protocol (docs/protocol.md, version 2).

Kept free of server state so that test clients and the call's peers can import them: the binary
picture header, the error codes and which of them end the connection.

Version 2 changed the binary picture header (picture format 2): it starts with a format byte and
carries the peer id of whoever sent the picture (stamped by the server), so that a page can tell
a two-way call's two callers' pictures apart. Format-1 pictures (13 bytes, kind first) are
refused with one clear error.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

PROTOCOL_VERSION = 2
WS_PATH = "/ws"

MAX_TEXT_BYTES = 64 * 1024  # control messages (JSON)
MAX_BINARY_BYTES = 2 * 1024 * 1024  # one JPEG picture with its header
# websockets' own limit sits above ours so that we, not the library, answer an oversized message
# with a `too_large` error before closing.
WS_MAX_SIZE = MAX_BINARY_BYTES + 64 * 1024

# Binary picture kinds.
KIND_DECODED = 1  # receiver → viewers
KIND_ORIGINAL = 2  # sender → viewers
KIND_CAMERA = 3  # viewer → sender; a caller's page → its own call program
KIND_AUDIO = 4  # a caller's page → its own call program: microphone PCM (see pack_pcm)

ROLES = ("sender", "receiver", "viewer")  # what a join may ask to be
CALL_ROLES = ("sender", "receiver")  # the call's seats (one peer each); viewers only watch

# A bitrate target a page (or the receiver) may ask the sender for (`set_bitrate`): wide enough
# for any call, narrow enough that a typo cannot starve the call or flood the link.
BITRATE_MIN_KBPS = 30.0
BITRATE_MAX_KBPS = 5000.0
BITRATE_MESSAGE_CHARS = 200  # the sender's answer text, at most

# Picture format 2: format byte, kind, sender (4 bytes: a peer id's 8 hex digits; clients send
# zeros, the server stamps the real sender), frame number, capture timestamp (µs since the epoch).
PICTURE_FORMAT = 0x82  # byte 0; format 1 had the kind there (1..3), so the two never collide
_HEADER = struct.Struct(">BB4sIQ")
HEADER_SIZE = _HEADER.size  # 18 bytes
SENDER_SLICE = slice(2, 6)  # where the server stamps the sender
OLD_HEADER_KINDS = (1, 2, 3)  # byte 0 of a format-1 picture
NO_SENDER = bytes(4)

# Microphone PCM (kind 4): payload = sample rate (u32 BE) + mono int16 little-endian samples.
PCM_RATES = (8000, 16000, 24000, 32000, 44100, 48000)
PCM_MAX_SAMPLES = 4800  # 100 ms at 48 kHz per chunk, at most (the page sends 20 ms)
AUDIO_MAX_CHUNKS_PER_S = 100  # passed on to the call program per second, at most

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
    """The 18-byte header in front of every binary picture (format 2)."""

    kind: int
    frame: int
    timestamp_us: int
    sender: str = ""  # the peer id of the sender as the server stamped it ("" when zeros)


def now_us() -> int:
    """Capture timestamps are µs since the Unix epoch, so a browser on the same machine can
    compare them with Date.now()."""
    return time.time_ns() // 1000


def pack_frame(kind: int, frame: int, jpeg: bytes, timestamp_us: int | None = None,
               sender: str = "") -> bytes:
    """Build one binary picture message (format 2): header + payload. `sender` is a peer id (8
    hex digits); clients leave it empty: the server stamps the real one."""
    ts = now_us() if timestamp_us is None else timestamp_us
    return _HEADER.pack(PICTURE_FORMAT, kind, sender_bytes(sender), frame & 0xFFFFFFFF,
                        ts & 0xFFFFFFFFFFFFFFFF) + jpeg


def sender_bytes(peer_id: str) -> bytes:
    """A peer id (8 hex digits, server.rooms) as the header's 4 bytes; "" is zeros."""
    if not peer_id:
        return NO_SENDER
    try:
        raw = bytes.fromhex(peer_id)
    except ValueError:
        raw = b""
    if len(raw) != 4:
        raise ValueError(f"a sender is a peer id of 8 hex digits, not {peer_id[:16]!r}")
    return raw


def picture_format_error(message: bytes) -> str | None:
    """Why `message` is not a format-2 picture (None: it has the header)."""
    if len(message) >= 1 and message[0] in OLD_HEADER_KINDS and message[0] != PICTURE_FORMAT:
        return ("picture format 1 (a 13-byte header starting with the kind, no sender) is no "
                "longer accepted: this server speaks picture format 2 (docs/protocol.md, "
                f"protocol version {PROTOCOL_VERSION}): update the client (reload the page)")
    if len(message) < 1 or message[0] != PICTURE_FORMAT:
        return (f"not a picture: a binary message starts with the format byte "
                f"0x{PICTURE_FORMAT:02x} (docs/protocol.md)")
    if len(message) < HEADER_SIZE:
        return (f"binary message of {len(message)} bytes is shorter than the "
                f"{HEADER_SIZE}-byte picture header (format, kind, sender, frame, timestamp)")
    return None


def unpack_frame(message: bytes) -> tuple[FrameHeader, bytes]:
    """Split a binary picture message into its header and payload.

    Raises ValueError (with picture_format_error's text) when it is not a format-2 picture.
    """
    if (problem := picture_format_error(message)) is not None:
        raise ValueError(problem)
    _, kind, sender, frame, ts = _HEADER.unpack_from(message)
    return (FrameHeader(kind, frame, ts, "" if sender == NO_SENDER else sender.hex()),
            bytes(message[HEADER_SIZE:]))


def pack_pcm(samples: bytes, sample_rate: int) -> bytes:
    """A kind-4 payload: the sample rate, then mono int16 little-endian samples."""
    return struct.pack(">I", sample_rate) + samples


def unpack_pcm(payload: bytes) -> tuple[int, bytes]:
    """(sample rate, int16 LE sample bytes) of a kind-4 payload; ValueError when malformed."""
    if len(payload) < 6 or (len(payload) - 4) % 2:
        raise ValueError("a microphone chunk is a u32 sample rate and whole int16 samples")
    (rate,) = struct.unpack_from(">I", payload)
    if rate not in PCM_RATES:
        raise ValueError(f"microphone sample rate must be one of {PCM_RATES}, got {rate}")
    if (len(payload) - 4) // 2 > PCM_MAX_SAMPLES:
        raise ValueError(f"a microphone chunk holds at most {PCM_MAX_SAMPLES} samples")
    return rate, bytes(payload[4:])
