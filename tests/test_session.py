"""P-frames: residual coding, the sender's session and the receiver's reference in lock-step.

The sender (`EncoderSession`) and the receiver (`FrameAssembler`) must hold the same reference
codes after every frame, or the receiver must know they differ (`needs_keyframe`) and get back
in step once the I-frame it asks for arrives: checked under random loss patterns with the
shipped model on real frames of the bundled clip."""

from __future__ import annotations

import hashlib
import itertools
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.assembler import FrameAssembler
from streamer.codec import NeuralCodec, bitstream, residual
from streamer.codec.residual import ResidualCoder
from streamer.errors import PacketError
from streamer.session import EncoderSession, FrameType
from streamer.sources import prepare
from streamer.video import SAMPLE_CLIP, read_frames

from golden import check_golden

GOLDEN = Path(__file__).parent / "data" / "golden_inter_packet.sha256"
SLICE = 1160


@pytest.fixture(scope="module")
def codec() -> NeuralCodec:
    return NeuralCodec.load()


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [prepare(f, 224) for f in read_frames(SAMPLE_CLIP, 24)]


def test_the_shipped_model_codes_p_frames_and_they_are_smaller(codec, frames):
    assert codec.codes_p_frames
    s = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0)
    sizes = {FrameType.INTRA: [], FrameType.INTER: []}
    for n, f in enumerate(frames[:8]):
        cand = s.encode(f, n, n * 33_333)
        s.commit(cand)
        sizes[cand.frame_type].append(sum(map(len, cand.packets)))
    assert len(sizes[FrameType.INTRA]) == 1 and len(sizes[FrameType.INTER]) == 7
    assert np.mean(sizes[FrameType.INTER]) < 0.6 * sizes[FrameType.INTRA][0], sizes


def test_residual_coding_round_trips_at_every_level(codec, frames):
    coder = codec.residual
    for level in range(codec.levels):
        a, b = (codec.encode(f, level).codes for f in frames[3:5])
        res = residual.residuals(b, a)
        payload = coder.encode(res, level)
        assert np.array_equal(coder.decode(payload, res.shape, level), res)
        est = coder.estimate_bits(res, level).sum() / 8
        assert abs(len(payload) - est) <= 0.03 * est + 8  # the tables' ideal length, to a few words


def test_a_short_payload_claiming_many_residuals_is_refused(codec):
    with pytest.raises(PacketError, match="cannot hold"):
        codec.residual.decode(b"\0" * 8, (24, 28, 28), 3)


def test_requantize_is_the_identity_on_one_level_and_stays_in_the_alphabet(codec, frames):
    q = codec.quantizer
    codes = codec.encode(frames[0], 3).codes
    assert q.requantize(codes, 3, 3) is codes
    for a, b in itertools.permutations(range(codec.levels), 2):
        out = q.requantize(codec.encode(frames[0], a).codes, a, b)
        assert out.dtype == np.uint8 and (out < q.alphabet(b)[0][:, None, None]).all()


def test_a_level_change_between_frames_still_decodes_exactly(codec, frames):
    s, asm = EncoderSession(codec, max_packet_bytes=SLICE), FrameAssembler(codec)
    types = []
    for n, level in enumerate([3, 3, 5, 2, 6, 0, 3]):
        cand = s.encode(frames[n], n, n * 33_333, level=level)
        s.commit(cand)
        out = [f for p in cand.packets for f in asm.add(p)]
        assert len(out) == 1 and np.array_equal(out[0].codes, cand.q.codes), (n, level)
        assert out[0].reference_ok and not asm.needs_keyframe
        types.append(cand.frame_type)
    # P-frames across the level changes, except where the I-frame is smaller (the I/P decision:
    # residuals from a coarse level to a much finer one can cost more than the frame alone)
    assert types[0] == FrameType.INTRA and types[1:4] == [FrameType.INTER] * 3


def deliver(asm: FrameAssembler, packets: list[bytes], lose: set[int]) -> list:
    out = []
    for i, p in enumerate(packets):
        if i not in lose:
            out += asm.add(p)
    return out


@pytest.mark.parametrize("recovery", ["keyframe", "refresh"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=8, max_size=16))
def test_references_stay_in_lock_step_or_the_receiver_knows_and_recovers(codec, frames, recovery, pattern):
    """pattern: per frame (drop the whole frame?, which slice to lose: 0 = none). After every
    frame the receiver's codes equal the sender's reference, or it knows they do not; when it
    knows, its recovery request (naming the frame its reference broke at) reaches the sender,
    and the first I-frame, or the first whole intra refresh, that gets through puts them back in
    step."""
    s = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0, recovery=recovery)
    asm = FrameAssembler(codec)
    for n, (drop_frame, lose_slice) in enumerate(pattern):
        cand = s.encode(frames[n % len(frames)], n, n * 33_333)
        s.commit(cand)  # the sender sent it; the network may still lose it
        lose = set(range(len(cand.packets))) if drop_frame and n else {lose_slice - 1} if lose_slice else set()
        out = deliver(asm, cand.packets, lose)
        shown = out[-1] if out else None
        in_step = shown is not None and shown.frame_number == n and np.array_equal(shown.codes, cand.q.codes)
        knows = asm.needs_keyframe or shown is None or shown.frame_number != n
        assert in_step or knows, (n, lose, cand.frame_type)
        if asm.needs_keyframe:
            s.request_keyframe(asm.broken_at)
    # a loss-free tail: a loss the receiver learns of only now (a whole last frame) is asked
    # for, the I-frame (or the refresh) answers it, and within three frames (three more than a
    # refresh takes) everything is back in step
    tail = 3 + (s.refresh_frames if recovery == "refresh" else 0)
    for n in range(len(pattern), len(pattern) + tail):
        if asm.needs_keyframe:
            s.request_keyframe(asm.broken_at)
        cand = s.encode(frames[n % len(frames)], n, n * 33_333)
        s.commit(cand)
        shown = deliver(asm, cand.packets, set())[-1]
        assert shown.frame_number == n
    assert np.array_equal(shown.codes, cand.q.codes) and shown.reference_ok and not asm.needs_keyframe


def test_a_lost_slice_breaks_the_reference_and_the_next_i_frame_restores_it(codec, frames):
    s, asm = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0, recovery="keyframe"), FrameAssembler(codec)
    for n in range(3):
        cand = s.encode(frames[n], n, n * 33_333)
        s.commit(cand)
        deliver(asm, cand.packets, set())
    assert not asm.needs_keyframe
    cand = s.encode(frames[3], 3, 3 * 33_333, level=0)  # fine level: several slices
    s.commit(cand)
    assert cand.frame_type == FrameType.INTER and len(cand.packets) >= 2
    (shown,) = deliver(asm, cand.packets, {0})
    assert not shown.complete and asm.needs_keyframe  # the receiver knows
    s.request_keyframe()
    cand = s.encode(frames[4], 4, 4 * 33_333)
    s.commit(cand)
    assert cand.frame_type == FrameType.INTRA
    (shown,) = deliver(asm, cand.packets, set())
    assert np.array_equal(shown.codes, cand.q.codes) and not asm.needs_keyframe
    cand = s.encode(frames[5], 5, 5 * 33_333)
    assert cand.frame_type == FrameType.INTER  # and P-frames go on from there


def test_a_refresh_heals_the_reference_band_by_band_without_an_i_frame(codec, frames):
    s = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0, recovery="refresh", refresh_frames=7)
    asm = FrameAssembler(codec)
    for n in range(3):
        cand = s.encode(frames[n], n, n * 33_333)
        s.commit(cand)
        deliver(asm, cand.packets, set())
    cand = s.encode(frames[3], 3, 3 * 33_333, level=0)  # fine level: several slices
    s.commit(cand)
    deliver(asm, cand.packets, {0})  # the top rows are lost
    assert asm.needs_keyframe and asm.broken_at == 3
    assert s.request_keyframe(asm.broken_at)
    sizes, types = [], []
    for n in range(4, 4 + s.refresh_frames):
        if asm.needs_keyframe and n > 4:  # it asks again while the refresh runs: already answered
            assert not s.request_keyframe(asm.broken_at)
        cand = s.encode(frames[n], n, n * 33_333)
        s.commit(cand)
        (shown,) = deliver(asm, cand.packets, set())
        types.append(cand.frame_type)
        sizes.append(sum(map(len, cand.packets)))
        bands = [bitstream.header_fields(p) for p in cand.packets]
        assert any(b["frame_type"] == bitstream.FRAME_INTRA for b in bands)  # this frame's band
    assert types == [FrameType.INTER] * s.refresh_frames  # never a whole I-frame
    assert shown.reference_ok and not asm.needs_keyframe and np.array_equal(shown.codes, cand.q.codes)
    # a refresh frame costs far less than an I-frame would
    intra = sum(map(len, codec.pack(codec.encode(frames[5], 3), 5, 0, SLICE)))
    assert max(sizes) < 0.6 * intra, (sizes, intra)
    # a new break after the refresh began starts another one
    cand = s.encode(frames[12], 12, 12 * 33_333)
    s.commit(cand)
    assert s.request_keyframe(12)


def test_a_request_for_a_break_the_last_i_frame_answered_is_not_answered_again(codec, frames):
    s = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0, recovery="keyframe")
    for n in range(3):
        s.commit(s.encode(frames[n], n, n * 33_333))
    assert s.request_keyframe(1)
    cand = s.encode(frames[3], 3, 3 * 33_333)
    assert cand.frame_type == FrameType.INTRA
    s.commit(cand)
    assert not s.request_keyframe(1) and not s.request_keyframe(2)  # the I-frame at 3 answers them
    assert s.next_frame_type() == FrameType.INTER
    assert s.request_keyframe(3)  # a break at the I-frame itself (it was lost) is answered
    assert s.next_frame_type() == FrameType.INTRA


def test_a_dropped_candidate_is_not_the_reference(codec, frames):
    s = EncoderSession(codec, max_packet_bytes=SLICE)
    first = s.encode(frames[0], 0, 0)
    s.commit(first)
    s.encode(frames[1], 1, 33_333)  # the channel was busy: never sent, never committed
    assert s.reference.frame_number == 0 and np.array_equal(s.reference.codes, first.q.codes)


def test_an_inter_slice_naming_another_reference_breaks_ours(codec, frames):
    """Each P slice names its reference frame (v3 header): residuals meant for a frame the
    receiver does not hold are shown as best it can, but its reference is known broken."""
    s, asm = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0), FrameAssembler(codec)
    for n in range(2):
        cand = s.encode(frames[n], n, n * 33_333)
        s.commit(cand)
        deliver(asm, cand.packets, set())
    assert not asm.needs_keyframe
    cand = s.encode(frames[2], 2, 2 * 33_333)
    assert cand.frame_type == FrameType.INTER
    named = [bitstream.header_fields(p)["ref_distance"] for p in cand.packets]
    assert set(named) <= {0, 1} and 1 in named  # inter slices name frame 1; intra fallbacks none
    moved = [bitstream.rewrite_header(p, ref_distance=2) if bitstream.header_fields(p)["ref_distance"] else p
             for p in cand.packets]  # as if coded against frame 0
    (shown,) = deliver(asm, moved, set())
    assert shown.complete and not shown.reference_ok and asm.needs_keyframe
    assert asm.n.mispredicted == 1
    with pytest.raises(ValueError, match="reference"):
        codec.pack_inter(cand.q, residual.residuals(cand.q.codes, cand.q.codes), 5, 0, SLICE, ref_frame_number=5)


def test_periodic_refresh_without_i_frames(codec, frames):
    s = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=10, recovery="refresh", refresh_frames=7)
    types, starts = [], []
    for n in range(22):
        cand = s.encode(frames[n], n, n * 33_333)
        s.commit(cand)
        types.append(int(cand.frame_type))
        starts.append(cand.refresh_rows[0] if cand.refresh_rows else None)
    assert types == [0] + [1] * 21  # one I-frame, to start the call
    assert [n for n, r in enumerate(starts) if r == 0] == [10, 20]  # a refresh every 10 frames
    assert starts[10:17] == [0, 4, 8, 12, 16, 20, 24] and starts[17:20] == [None] * 3


def test_keyframe_interval_forces_i_frames(codec, frames):
    s = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=4, recovery="keyframe")
    types = []
    for n in range(9):
        cand = s.encode(frames[n], n, n * 33_333)
        s.commit(cand)
        types.append(int(cand.frame_type))
    assert types == [0, 1, 1, 1, 0, 1, 1, 1, 0]


def inter_packet(codec, frames, level=3) -> bytes:
    a, b = codec.encode(frames[6], level), codec.encode(frames[7], level)
    (packet, *_) = codec.pack_inter(b, residual.residuals(b.codes, a.codes), 11, 1_700_000_000_000_000)
    return packet


def test_golden_inter_packet_is_stable(codec, frames):
    """The bytes of a P slice (the shipped model's residual tables, real frames of the bundled
    clip) are a contract between sender and receiver builds: a missing golden file fails; only
    UPDATE_GOLDEN=1 (re)writes it (see tests/golden.py)."""
    packet = inter_packet(codec, frames)
    h = bitstream.header_fields(packet)
    assert (h["frame_type"], h["ref_distance"]) == (bitstream.FRAME_INTER, 1)
    assert codec.unpack(packet).header.ref_frame_number == 10
    check_golden(GOLDEN, hashlib.sha256(packet).hexdigest())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_the_strict_parser_refuses_mutated_inter_packets(codec, frames, data):
    packet = bytearray(_INTER.get("p") or _INTER.setdefault("p", inter_packet(codec, frames)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(packet) - 1))
        packet[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):  # a forger who recomputes the CRC
        packet[-4:] = zlib.crc32(bytes(packet[:-4])).to_bytes(4, "big")
    try:
        p = codec.unpack(bytes(packet), expect_shape=codec.latent_shape())
    except PacketError:
        return
    if p.residual is not None:  # a mutation that still parses is bounded and in range
        sizes = codec.quantizer.alphabet(p.header.level)[0]
        assert (np.abs(p.residual.astype(np.int64)) < sizes[:, None, None]).all()


_INTER: dict[str, bytes] = {}


def test_residual_tables_travel_with_the_weights_and_change_the_model_id(codec, tmp_path):
    from streamer.codec import weights
    from streamer.errors import WeightsError

    cfg, model, mid = weights.load("default")
    assert cfg.residual_counts is not None and mid == codec.model_id
    cfg.residual_counts = cfg.residual_counts.copy()
    cfg.residual_counts[0, 0, 0, residual.OFFSET] += 1
    weights.save(tmp_path / "m", cfg, model)
    assert weights.load(tmp_path / "m")[2] != mid
    bad = cfg.residual_counts[:, :, :3]
    with pytest.raises(WeightsError, match="residual tables"):
        weights.check_residual_counts(bad, cfg)
    with pytest.raises(Exception):
        ResidualCoder(bad, [np.full(24, 10)] * cfg.residual_counts.shape[0])


def test_the_offline_decoder_session_shows_what_the_sender_coded(codec, frames):
    from streamer.session import DecoderSession

    enc, dec = EncoderSession(codec, max_packet_bytes=SLICE), DecoderSession(codec)
    for n in range(4):
        cand = enc.encode(frames[n], n, n * 33_333)
        enc.commit(cand)
        image = dec.decode(cand.packets)
        assert np.array_equal(image, codec.decode(cand.q)) and not dec.needs_keyframe


def test_a_scene_cut_goes_as_the_i_frame_when_that_is_fewer_bytes(codec, frames):
    """The I/P decision of the table-based P-frames: residuals against another picture cost
    more than the picture alone, so the cut is an I-frame (and the receiver's new reference);
    the frames after it are P-frames again."""
    from streamer.codec.residual import residuals

    other = [np.ascontiguousarray(255 - f[::-1]) for f in frames[2:4]]  # another picture: upside down, inverted
    s, asm = EncoderSession(codec, max_packet_bytes=SLICE), FrameAssembler(codec)
    sent = []
    for n, image in enumerate([frames[0], frames[1], other[0], other[1]]):
        level = 3
        if n == 2:  # what the P-frame across the cut would have cost
            pred = s.reference.codes
            q = codec.encode(image, level)
            p_bytes = sum(map(len, codec.pack_inter(q, residuals(q.codes, pred), n, 0, SLICE, n - 1)))
        cand = s.encode(image, n, n * 33_333, level=level)
        s.commit(cand)
        out = [f for p in cand.packets for f in asm.add(p)]
        assert len(out) == 1 and np.array_equal(out[0].codes, cand.q.codes) and out[0].reference_ok
        sent.append((cand.frame_type, sum(map(len, cand.packets))))
    assert [t for t, _ in sent] == [FrameType.INTRA, FrameType.INTER, FrameType.INTRA, FrameType.INTER]
    assert sent[2][1] < p_bytes
