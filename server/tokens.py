"""Per-role credentials of a room.

A room has one secret (random, or given with `python -m server --secret`); it never travels.
What a participant holds is the token of its role:

    role_token(secret, room, role) = first 32 hex digits of HMAC-SHA256(secret, room + ":" + role)

so a viewer's token tells nothing about the sender's (HMAC is a pseudo-random function of the
secret), and a server given the same secret prints the same links again after a restart. The
label is generic ("<room>:<credential>"). A two-way call's two people hold the same "caller"
token (one link to send the other person, as a meeting link): the room seats two callers and
refuses a third (server.rooms.MAX_CALLERS).

A caller's own page (its "face": the call's controls) holds a token of one more label,
"<room>:face:<peer id>" (`face_token`), which the server hands only to that caller program in
its `joined`. It lets a page steer that one program (hang up, mute, bitrate, its camera and
microphone) and nothing else: it takes no seat, and the other caller, who holds the same caller
link, cannot derive it. Peer ids are hex, so no face label equals a credential's label.
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


FACE = "face"


def face_token(secret: str, room: str, peer_id: str) -> str:
    """The token of the page that steers caller `peer_id` (its own call program) in `room`."""
    return role_token(secret, room, f"{FACE}:{peer_id}")


def face_matches(secret: str, room: str, peer_id: str, token: str) -> bool:
    """Constant-time check of a page's token against `face_token`."""
    return hmac.compare_digest(face_token(secret, room, peer_id).encode(),
                               token.encode("utf-8", "surrogatepass"))
