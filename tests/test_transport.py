"""Transport: loopback-only ICE, channel options, drain-or-drop sending, loss injection.

Peer connections are paired in-process (offer/answer handed over directly) on 127.0.0.1."""

import asyncio
import os

import aioice.ice
import pytest

from streamer import transport as T
from streamer.errors import ConfigError


def test_restrict_ice_is_scoped():
    original = T._original_get_host_addresses
    with T.restrict_ice(["127.0.0.1"]):
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(False, True) == []
    # outside the block aioice's own discovery answers again (and skips 127.0.0.1)
    assert aioice.ice.get_host_addresses(True, False) == original(True, False)
    with T.restrict_ice(None):
        assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, False)


def test_bad_ice_address_and_transport_options():
    with pytest.raises(ConfigError, match="not an IP"):
        T.check_ice_addresses(["localhost"])
    with pytest.raises(ConfigError, match="unknown transport"):
        T.TransportConfig("tcp")
    assert T.TransportConfig("slices").channel_options() == {"ordered": False, "maxRetransmits": 0}
    assert T.TransportConfig("slices").max_packet_bytes == T.SLICE_BYTES == 1160
    assert T.TransportConfig("lifetime", 80).channel_options() == {"ordered": False, "maxPacketLifeTime": 80}
    assert T.TransportConfig("lifetime").max_packet_bytes is None


def test_remote_candidates_filtered_on_loopback():
    sdp = ("v=0\r\na=candidate:1 1 udp 2130706431 10.0.0.5 5000 typ host\r\n"
           "a=candidate:2 1 udp 2130706431 127.0.0.1 5001 typ host\r\n"
           "a=candidate:3 1 udp 2130706431 abc.local 5002 typ host\r\na=end-of-candidates\r\n")
    out = T.filter_remote_candidates(sdp, ["127.0.0.1"])
    assert "127.0.0.1 5001" in out and "10.0.0.5" not in out and ".local" not in out
    assert T.filter_remote_candidates(sdp, None) == sdp


async def pair(cfg: T.TransportConfig):
    """Two connected peer connections on loopback; returns (a, b, latents, received list)."""
    a, b = T.create_peer_connection(), T.create_peer_connection()
    latents, meta = T.create_channels(a, cfg)
    got: list[bytes] = []
    opened = asyncio.Event()

    @b.on("datachannel")
    def on_dc(ch):
        if ch.label == T.LATENT_LABEL:
            ch.on("message", got.append)

    latents.on("open", opened.set)
    offer = await T.make_offer(a, ["127.0.0.1"])
    candidates = [l for l in offer["sdp"].splitlines() if l.startswith("a=candidate")]
    assert candidates and all(" 127.0.0.1 " in l for l in candidates)
    answer = await T.accept_offer(b, offer, ["127.0.0.1"])
    await T.accept_answer(a, answer, ["127.0.0.1"])
    await asyncio.wait_for(opened.wait(), 20)
    return a, b, latents, got


@pytest.mark.parametrize("mode", ["slices", "lifetime"])
def test_frames_cross_loopback(mode):
    async def main():
        cfg = T.TransportConfig(mode)
        a, b, ch, got = await pair(cfg)
        try:
            assert ch.ordered is False
            sender = T.ChannelSender(ch, threshold=10**9)
            size = 1000 if mode == "slices" else 14_000
            frames = [[os.urandom(size) for _ in range(3 if mode == "slices" else 1)] for _ in range(10)]
            for f in frames:
                assert sender.send_frame(f)
                await asyncio.sleep(0.01)
            for _ in range(200):
                if len(got) == sum(map(len, frames)):
                    break
                await asyncio.sleep(0.02)
            assert sorted(got) == sorted(p for f in frames for p in f)
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_sender_drops_instead_of_queuing():
    async def main():
        a, b, ch, got = await pair(T.TransportConfig())
        try:
            sender = T.ChannelSender(ch, threshold=0)
            frame = [os.urandom(1100) for _ in range(14)]
            assert sender.send_frame(frame)
            assert ch.bufferedAmount > 0
            assert not sender.send_frame(frame)  # the previous frame is still above SCTP
            assert sender.frames_dropped == 1
            for _ in range(100):
                if ch.bufferedAmount == 0:
                    break
                await asyncio.sleep(0.01)
            assert sender.send_frame(frame)  # drained: sends again
        finally:
            await a.close()
            await b.close()
        closed = T.ChannelSender(ch)
        assert not closed.send_frame([b"x"]) and closed.frames_dropped == 1  # closed channel: a drop
    asyncio.run(main())


def test_loss_injector_really_loses_chunks(monkeypatch):
    import aiortc.rtcsctptransport as sctp

    monkeypatch.setattr(sctp, "SCTP_RTO_MIN", sctp.SCTP_RTO_MIN)  # restored after the test
    T.tune_sctp(0.1)

    async def main():
        a, b, ch, got = await pair(T.TransportConfig())
        try:
            inj = T.LossInjector(a, 0.3, seed=1)
            sender = T.ChannelSender(ch)
            for i in range(30):
                sender.send_frame([os.urandom(1000) for _ in range(10)])
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            sent = 10 * sender.frames_sent
            assert inj.dropped > 20
            assert 0.4 * sent < len(got) < 0.95 * sent  # unreliable channel: lost slices stay lost
            inj.p = 0.0
            await asyncio.sleep(0.3)
            before = len(got)
            for i in range(5):
                assert sender.send_frame([os.urandom(1000) for _ in range(10)])
                await asyncio.sleep(0.02)
            for _ in range(150):
                if len(got) - before == 50:
                    break
                await asyncio.sleep(0.02)
            assert len(got) - before == 50  # loss over: everything arrives again
            inj.remove()
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_loss_injector_rejects_bad_probability():
    pc = T.create_peer_connection()
    with pytest.raises(ConfigError):
        T.LossInjector(pc, 1.5)
