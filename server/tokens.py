"""Per-role credentials of a room.

A room has one secret (random, or given with `python -m server --secret`); it never travels.
What a participant holds is the token of its role:

    role_token(secret, room, role) = first 32 hex digits of HMAC-SHA256(secret, room + ":" + role)

so a viewer's token tells nothing about the sender's (HMAC is a pseudo-random function of the
secret), and a server given the same secret prints the same links again after a restart. The
label is generic ("<room>:<credential>"). A two-way call's two people hold the same "caller"
token (one link to send the other person, as a meeting link): the room seats two callers and
refuses a third (server.rooms.MAX_CALLERS).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_HEX_DIGITS = 32  # 128 bits

# The credentials a room hands out. "caller" is a seat of a two-way call (streamer.call; two
# per room); "sender"/"receiver" the one-way call's seats; "camera" is a viewer that may also
# feed the sender's `--source browser` with its webcam; "viewer" only watches.
CREDENTIALS = ("caller", "sender", "receiver", "camera", "viewer")


def new_secret() -> str:
    """A fresh random room secret."""
    return secrets.token_hex(16)


def role_token(secret: str, room: str, role: str) -> str:
    """The token that lets its holder join `room` as `role`."""
    mac = hmac.new(secret.encode("utf-8", "surrogatepass"),
                   f"{room}:{role}".encode("utf-8", "surrogatepass"), hashlib.sha256)
    return mac.hexdigest()[:TOKEN_HEX_DIGITS]


def matches(secret: str, room: str, role: str, token: str) -> bool:
    """Constant-time check of `token` against the token of `role` in `room`."""
    return hmac.compare_digest(role_token(secret, room, role).encode(),
                               token.encode("utf-8", "surrogatepass"))
