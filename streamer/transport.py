"""The call's transport: one aiortc RTCPeerConnection per call, latents on a data channel.

Two ways to carry a frame (`--transport`), both *unreliable* so a late frame never delays the
next one:

* ``slices`` (default): the frame is cut into independently decodable slices of at most one
  SCTP chunk (`SLICE_BYTES` = 1,160 bytes of user data in aiortc 1.16) on an unordered channel
  with ``maxRetransmits=0``. A lost chunk costs only its latent rows (the receiver conceals
  them), and no message ever spans two chunks, which sidesteps aiortc's unordered-reassembly
  bug (losing the last chunk of one multi-chunk message also drops the next message).
* ``lifetime``: whole frames (~13 chunks at 224 px) on an unordered channel with
  ``maxPacketLifeTime`` (SCTP retransmits a lost chunk until the lifetime ends). A frame is
  all-or-nothing and subject to the reassembly bug.

The bench (`python -m streamer.bench call --transport ...`) measures both; README.md ("The call") has the numbers.

Frames never queue: `ChannelSender.send_frame` sends only when the channel's bufferedAmount has
drained below a small threshold and otherwise drops the frame (counted).

ICE. aioice gathers host candidates from every interface but skips 127.0.0.1, so a loopback
call would not connect. `restrict_ice(addresses)` makes gathering inside the `with` block (or
the task that called it) use exactly the given addresses: aioice.ice.Connection calls the
module-level `aioice.ice.get_host_addresses(use_ipv4, use_ipv6)`; it is wrapped once by a
function that returns a context variable's addresses when set and defers to the original
otherwise, so concurrent peer connections in one process are unaffected by each other. No STUN
server is configured unless asked (`RTCConfiguration(iceServers=[])`): aiortc's default would
contact stun.l.google.com. `ice_servers` builds the asked ones: STUN URLs, and one TURN server
(`RTCIceServer(urls, username, credential)`) for peers that no direct path joins; every URL is
checked first, since aiortc silently skips one it cannot use.

Loss simulation (`LossInjector`, for the bench and tests): the sender's RTCDtlsTransport
`_send_data` — the point where an SCTP packet is handed to DTLS/ICE/UDP — is wrapped to drop
outgoing packets with probability p. SCTP chunks are then really lost on the wire: the peer's
SACKs report gaps, the sender abandons (slices) or retransmits (lifetime) them, exactly as on
a lossy network.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import random
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from .errors import ConfigError

TRANSPORTS = ("slices", "lifetime")
DEFAULT_TRANSPORT = "slices"
SLICE_BYTES = 1160  # aiortc's USERDATA_MAX_LENGTH: (1189 - 12 - 16) // 4 * 4
LATENT_LABEL = "latents"
META_LABEL = "meta"
DEFAULT_LIFETIME_MS = 100
# Send a frame only while less than this is waiting above SCTP. One 224-px frame is ~14.7 KB,
# so 0 would drop the next frame whenever the previous one has not fully left; one frame's
# worth lets a frame overlap the tail of the previous one but never builds a queue.
DEFAULT_BUFFER_THRESHOLD = 16 * 1024
# aiortc's minimum RTO is RFC 9260's 1 s. On a low-RTT path that is the length of every freeze
# caused by losing the last chunks in flight (only T3 notices). Measured on loopback, 20 % loss,
# 30 fps: longest gap 1.98 s at 1 s, 0.35 s at 0.2 s, 0.19 s at 0.1 s (README.md, "The call").
# The RTO still follows the measured RTT above this floor.
DEFAULT_RTO_MIN_S = 0.1


# -- ICE: restrict host candidates ---------------------------------------------------------

_ICE_ADDRESSES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("ice_addresses", default=None)
_original_get_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _ICE_ADDRESSES.get()
    if addresses is None:
        return _original_get_host_addresses(use_ipv4, use_ipv6)
    return [a for a in addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def _install_ice_hook() -> None:
    if aioice.ice.get_host_addresses is not _get_host_addresses:
        aioice.ice.get_host_addresses = _get_host_addresses


def check_ice_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """Validate IP literals (ConfigError otherwise)."""
    out = []
    for a in addresses:
        try:
            out.append(str(ipaddress.ip_address(a.strip())))
        except ValueError:
            raise ConfigError(f"--ice-address {a!r} is not an IP address (e.g. 127.0.0.1)") from None
    return tuple(out)


@contextlib.contextmanager
def restrict_ice(addresses: Sequence[str] | None) -> Iterator[None]:
    """Within the block, ICE gathering uses exactly `addresses` as host candidates (None: all
    interfaces, aioice's default). Tasks created inside inherit the setting."""
    if not addresses:
        yield
        return
    _install_ice_hook()
    token = _ICE_ADDRESSES.set(check_ice_addresses(addresses))
    try:
        yield
    finally:
        _ICE_ADDRESSES.reset(token)


def only_loopback(addresses: Sequence[str] | None) -> bool:
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)  # type: ignore[union-attr]


_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ", re.M)


def filter_remote_candidates(sdp: str, addresses: Sequence[str] | None) -> str:
    """When we gather on loopback only, the remote peer's non-loopback candidates can never
    pair with ours; drop them so no connectivity check is ever sent off the machine."""
    if not only_loopback(addresses):
        return sdp
    kept = []
    for line in sdp.splitlines(keepends=True):
        m = _CANDIDATE.match(line)
        if m:
            try:
                if not ipaddress.ip_address(m.group(1)).is_loopback:
                    continue
            except ValueError:  # an mDNS .local name: cannot be loopback
                continue
        kept.append(line)
    return "".join(kept)


# -- peer connection -----------------------------------------------------------------------

# aiortc's own pattern takes a host without ':' (no bracketed IPv6 literal)
_ICE_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<host>[^?:/\[\]]+)"
                      r"(?::(?P<port>[^?]*))?(?:\?(?P<query>.*))?$")
TURN_CREDENTIAL_ENV = "STREAMER_TURN_CREDENTIAL"


def check_ice_url(url: str, option: str, schemes: Sequence[str]) -> dict[str, Any]:
    """Parse a STUN/TURN URL as aiortc will (RFC 7064/7065: scheme:host[:port][?transport=udp|tcp]);
    ConfigError with one line saying what is wrong. aiortc itself would skip a TURN URL it
    does not like without a word, and the call would then fail to connect behind NAT."""
    example = {"stun": "stun:stun.example.org:3478", "turn": "turn:turn.example.org:3478?transport=udp"}[schemes[0][:4]]
    m = _ICE_URL.match(url.strip())
    if not m:
        raise ConfigError(f"{option} {url!r} is not a {schemes[0].upper()} URL (e.g. {example})")
    scheme = m["scheme"].lower()
    if scheme not in schemes:
        raise ConfigError(f"{option} {url!r}: the scheme must be {' or '.join(s + ':' for s in schemes)}, "
                          f"got {scheme}: (e.g. {example})")
    port = m["port"]
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"{option} {url!r}: the port must be a number in 1..65535, got {port!r}")
    transport = None
    if m["query"] is not None:
        if scheme.startswith("stun"):
            raise ConfigError(f"{option} {url!r}: a STUN URL takes no ?transport= (e.g. {example})")
        key, _, transport = m["query"].partition("=")
        allowed = ("tcp",) if scheme == "turns" else ("udp", "tcp")
        if key != "transport" or transport not in allowed:
            raise ConfigError(f"{option} {url!r}: the only query is ?transport={'|'.join(allowed)}, "
                              f"got ?{m['query']}")
    return {"scheme": scheme, "host": m["host"], "port": int(port) if port else None, "transport": transport}


def ice_servers(stun: Sequence[str] = (), turn: str | None = None, username: str | None = None,
                credential: str | None = None) -> list[RTCIceServer]:
    """The peer connection's ICE servers: each STUN URL, and the TURN server with its username
    and credential (validated: ConfigError). aiortc uses the first STUN and the first TURN
    server only."""
    servers = []
    for url in stun:
        check_ice_url(url, "--stun", ("stun", "stuns"))
        servers.append(RTCIceServer(urls=url.strip()))
    if turn:
        check_ice_url(turn, "--turn", ("turn", "turns"))
        if not username:
            raise ConfigError(f"--turn {turn!r} needs --turn-user (the TURN server's username)")
        if not credential:
            raise ConfigError(f"--turn {turn!r} needs --turn-credential or ${TURN_CREDENTIAL_ENV} "
                              "(the TURN server's password)")
        servers.append(RTCIceServer(urls=turn.strip(), username=username, credential=credential))
    elif username or credential:
        raise ConfigError("--turn-user / --turn-credential given without --turn turn:HOST:PORT")
    return servers


def create_peer_connection(stun: Sequence[str | RTCIceServer] = ()) -> RTCPeerConnection:
    """A peer connection with no STUN/TURN unless given (offline and loopback calls need none):
    `stun` holds STUN URLs and/or RTCIceServer objects (`ice_servers`, e.g. a TURN server)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=ice_configuration(stun)))


def ice_configuration(servers: Sequence[str | RTCIceServer]) -> list[RTCIceServer]:
    return [s if isinstance(s, RTCIceServer) else RTCIceServer(urls=s) for s in servers]


async def make_offer(pc: RTCPeerConnection, ice_addresses: Sequence[str] | None = None) -> dict[str, str]:
    """Create and set the local offer; returns {"type", "sdp"} with candidates inside (no trickle)."""
    with restrict_ice(ice_addresses):
        await pc.setLocalDescription(await pc.createOffer())
    return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}


async def accept_offer(pc: RTCPeerConnection, offer: dict[str, Any],
                       ice_addresses: Sequence[str] | None = None,
                       add_tracks: Callable[[RTCPeerConnection], object] | None = None) -> dict[str, str]:
    """Apply a remote offer and return our answer. `add_tracks(pc)` adds our media tracks in
    between: after the offer made the transceivers (ours then take the offered audio one),
    before the answer (which then says sendrecv)."""
    sdp = filter_remote_candidates(str(offer["sdp"]), ice_addresses)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    if add_tracks is not None:
        add_tracks(pc)
    with restrict_ice(ice_addresses):
        await pc.setLocalDescription(await pc.createAnswer())
    return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}


async def accept_answer(pc: RTCPeerConnection, answer: dict[str, Any],
                        ice_addresses: Sequence[str] | None = None) -> None:
    sdp = filter_remote_candidates(str(answer["sdp"]), ice_addresses)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))


# -- data channels -------------------------------------------------------------------------

@dataclass(frozen=True)
class TransportConfig:
    mode: str = DEFAULT_TRANSPORT
    lifetime_ms: int = DEFAULT_LIFETIME_MS
    buffer_threshold: int = DEFAULT_BUFFER_THRESHOLD

    def __post_init__(self) -> None:
        if self.mode not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.mode!r}; valid: {', '.join(TRANSPORTS)}")
        if self.lifetime_ms < 1:
            raise ConfigError(f"lifetime must be >= 1 ms, got {self.lifetime_ms}")

    @property
    def max_packet_bytes(self) -> int | None:
        """Slice size for `NeuralCodec.packets`: one SCTP chunk, or whole frames."""
        return SLICE_BYTES if self.mode == "slices" else None

    def channel_options(self) -> dict[str, Any]:
        if self.mode == "slices":
            return {"ordered": False, "maxRetransmits": 0}
        return {"ordered": False, "maxPacketLifeTime": self.lifetime_ms}


def create_channels(pc: RTCPeerConnection, cfg: TransportConfig) -> tuple[RTCDataChannel, RTCDataChannel]:
    """The offerer's channels: latents (per `cfg`) and meta (small per-frame side messages:
    codes checksum and, with --measure, the sender's PSNR; unordered, no retransmits)."""
    latents = pc.createDataChannel(LATENT_LABEL, **cfg.channel_options())
    meta = pc.createDataChannel(META_LABEL, ordered=False, maxRetransmits=0)
    return latents, meta


class ChannelSender:
    """Sends a frame's packets on a channel when it has drained; drops the frame otherwise."""

    def __init__(self, channel: RTCDataChannel, threshold: int = DEFAULT_BUFFER_THRESHOLD) -> None:
        self.channel = channel
        self.threshold = threshold
        self.frames_sent = 0
        self.frames_dropped = 0  # dropped because the channel had not drained (or was not open)
        self.bytes_sent = 0

    @property
    def ready(self) -> bool:
        return self.channel.readyState == "open" and self.channel.bufferedAmount <= self.threshold

    def send_frame(self, packets: Sequence[bytes]) -> bool:
        """All packets of one frame, or none (False) when the channel is backed up or closed."""
        if not self.ready:
            self.frames_dropped += 1
            return False
        try:
            for p in packets:
                self.channel.send(p)
                self.bytes_sent += len(p)
        except Exception:  # noqa: BLE001 - the channel closed under us: a dropped frame, not a crash
            self.frames_dropped += 1
            return False
        self.frames_sent += 1
        return True


# -- loss simulation -----------------------------------------------------------------------

class LossInjector:
    """Drops the sender's outgoing SCTP packets at random with probability `p` (see the module
    docstring for where). `p` can change at any time; 0 restores a clean channel."""

    def __init__(self, pc: RTCPeerConnection, p: float, seed: int | None = None) -> None:
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"loss probability must be in [0, 1), got {p}")
        self.p = p
        self.rng = random.Random(seed)
        self.sent = 0
        self.dropped = 0
        self._dtls = pc.sctp.transport if pc.sctp is not None else None
        if self._dtls is None:
            raise ConfigError("the peer connection has no data-channel transport yet")
        self._orig: Callable[[bytes], Awaitable[None]] = self._dtls._send_data
        self._dtls._send_data = self._send_data  # instance attribute shadows the method

    async def _send_data(self, data: bytes) -> None:
        if self.p > 0 and self.rng.random() < self.p:
            self.dropped += 1
            return
        self.sent += 1
        await self._orig(data)

    def remove(self) -> None:
        if self._dtls is not None:
            self._dtls.__dict__.pop("_send_data", None)
            self._dtls = None


def tune_sctp(rto_min_s: float | None) -> None:
    """Lower aiortc's minimum SCTP retransmission timeout (1 s, RFC 9260's conservative value).

    When the last chunks in flight are lost and the window is full, only the T3 timer detects
    the loss, and the call freezes for a whole RTO. A real-time data channel would rather
    abandon such chunks sooner. Process-wide (aiortc reads the module constant)."""
    if rto_min_s is None:
        return
    import aiortc.rtcsctptransport as sctp

    sctp.SCTP_RTO_MIN = float(rto_min_s)


__all__ = ["TRANSPORTS", "SLICE_BYTES", "TransportConfig", "ChannelSender", "LossInjector", "create_channels",
           "create_peer_connection", "make_offer", "accept_offer", "accept_answer", "restrict_ice",
           "filter_remote_candidates", "tune_sctp", "check_ice_addresses", "check_ice_url", "ice_servers",
           "TURN_CREDENTIAL_ENV"]
