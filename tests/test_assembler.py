"""Slices -> frames: completeness, concealment, ordering, bad packets, sender restarts."""

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.assembler import (MAX_CONCEAL_CHAIN, MAX_DEADLINE_S, MAX_FRAME_GAP, MAX_PENDING, SPREAD_WINDOW,
                               FrameAssembler, codes_crc)
from streamer.codec import NeuralCodec, bitstream
from streamer.errors import FrameSizeError
from streamer.transport import SLICE_BYTES


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def codec() -> NeuralCodec:
    return NeuralCodec.untrained("lite", frame_size=64)


def frame(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def sliced(codec: NeuralCodec, seed: int, number: int, ts: int | None = None, max_bytes: int = 200):
    q = codec.encode(frame(seed))
    packets = bitstream.pack_frame(q, codec.model_id, number, ts if ts is not None else 1_000_000 + number, max_bytes)
    return q, packets


def test_slices_fit_one_sctp_chunk_at_224():
    codec = NeuralCodec.untrained("lite")
    packets = codec.packets(frame(0, 224), 0, 0, SLICE_BYTES)
    assert len(packets) > 1 and max(map(len, packets)) <= SLICE_BYTES


def test_complete_frame_in_any_order_is_bit_exact(codec):
    q, packets = sliced(codec, 1, 7)
    assert len(packets) >= 3
    asm = FrameAssembler(codec, conceal_on_last=False)  # out of order: the last slice comes first
    out = []
    for p in reversed(packets):
        out += asm.add(p)
    assert len(out) == 1 and out[0].complete and out[0].frame_number == 7
    assert np.array_equal(out[0].codes, q.codes)
    assert out[0].crc() == codes_crc(q.codes)
    assert torch.equal(out[0].latents(codec), codec.latents(q.codes))
    assert asm.n.complete == 1 and asm.n.concealed == 0


@pytest.mark.parametrize("mode", ["fixed", "minmax"])
def test_missing_slice_is_concealed_from_previous_frame(codec, mode):
    if mode == "minmax":
        codec = NeuralCodec.untrained("lite", frame_size=64, mode="minmax")
    clock = Clock()
    asm = FrameAssembler(codec, deadline_s=0.02, clock=clock)
    q1, p1 = sliced(codec, 1, 1)
    q2, p2 = sliced(codec, 2, 2)
    for p in p1:
        asm.add(p)
    rows = bitstream.unpack(p2[-1]).header
    out = []
    for p in p2[:-1]:  # the last slice is lost
        out += asm.add(p)
    assert out == []  # waits: the slice might still come
    clock.t += 0.03
    out = asm.poll()
    assert len(out) == 1 and out[0].concealed
    f = out[0]
    band = slice(rows.row_start, rows.row_start + rows.row_count)
    assert np.array_equal(f.codes[:, band], q1.codes[:, band])  # concealed rows: previous frame
    keep = np.ones(q2.codes.shape[1], bool)
    keep[band] = False
    assert np.array_equal(f.codes[:, keep], q2.codes[:, keep])
    y1 = codec.latents(q1.codes, q1.lo, q1.hi) if mode == "minmax" else codec.latents(q1.codes)
    y2 = codec.latents(q2.codes, q2.lo, q2.hi) if mode == "minmax" else codec.latents(q2.codes)
    assert torch.equal(f.latents(codec)[0, :, band], y1[0, :, band])  # previous frame's latents
    assert torch.equal(f.latents(codec)[0, :, keep], y2[0, :, keep])
    assert asm.n.concealed == 1


def test_deadline_grows_when_slices_come_after_it_and_shrinks_back(codec):
    """A frame's slices 150 ms apart (a loaded machine, a lossy link's shrunken window) against
    a 100 ms deadline: the first frame is given up, its late slice teaches the assembler, and the next
    frame with the same spread is whole. The wait is bounded, and returns to the least once a
    window of frames came close together again."""
    clock = Clock()
    asm = FrameAssembler(codec, deadline_s=0.1, clock=clock, conceal_on_last=False)
    assert asm.current_deadline_s == 0.1

    def spread_out(number: int, gap: float) -> list:
        out = []
        for p in sliced(codec, number, number)[1]:
            out += asm.add(p)
            clock.t += gap
            out += asm.poll() if asm.next_deadline() is not None and clock.t >= asm.next_deadline() else []
        return out

    first = spread_out(1, 0.15)
    assert [f.complete for f in first] == [False] and asm.n.late >= 1  # given up, then its slices came
    assert asm.current_deadline_s >= 1.5 * 0.15 - 1e-9
    second = spread_out(2, 0.15)
    assert [f.complete for f in second] == [True] and asm.n.concealed == 1

    # a slice of a given-up frame that comes very late (or a forged one) cannot stall the call
    asm2 = FrameAssembler(codec, deadline_s=0.1, clock=clock, conceal_on_last=False)
    packets = sliced(codec, 3, 3)[1]
    asm2.add(packets[0])
    clock.t += 0.2
    assert len(asm2.poll()) == 1
    clock.t += 60
    asm2.add(packets[1])
    assert asm2.current_deadline_s == MAX_DEADLINE_S

    # frames close together again: after a window of them, back to the least
    for n in range(4, 4 + SPREAD_WINDOW):
        assert [f.complete for f in spread_out(n, 0.001)] == [True]
    assert asm.current_deadline_s == 0.1


def test_a_frame_with_its_last_slice_in_is_shown_at_once(codec):
    asm = FrameAssembler(codec, deadline_s=10)
    _, p1 = sliced(codec, 1, 1)
    out = []
    for p in p1[:1] + p1[2:]:  # in row order, the second slice lost
        out += asm.add(p)
    assert len(out) == 1 and out[0].concealed and out[0].rows_received < out[0].rows_total


def test_newer_frame_flushes_an_incomplete_one_and_late_slices_are_dropped(codec):
    asm = FrameAssembler(codec, deadline_s=10)
    _, p1 = sliced(codec, 1, 1)
    _, p2 = sliced(codec, 2, 2)
    asm.add(p1[0])
    out = asm.add(p2[0])
    assert [f.frame_number for f in out] == [1] and out[0].concealed
    assert asm.add(p1[1]) == [] and asm.n.late == 1  # frame 1 is gone: never shown out of order
    out = []
    for p in p2[1:]:
        out += asm.add(p)
    assert [f.frame_number for f in out] == [2] and out[0].complete


def test_lost_frames_are_counted_and_duplicates_ignored(codec):
    asm = FrameAssembler(codec)
    for n in (1, 2, 5):
        _, ps = sliced(codec, n, n)
        for p in ps:
            asm.add(p)
        asm.add(ps[0])  # duplicate of an emitted frame: late
    assert asm.n.lost == 2 and asm.n.complete == 3
    _, ps = sliced(codec, 6, 6)
    asm.add(ps[0])
    asm.add(ps[0])
    assert asm.n.duplicate == 1


def corrupt_variants(packet: bytes, other_model: bytes) -> list[bytes]:
    flipped = bytearray(packet)
    flipped[len(packet) // 2] ^= 0x40
    return [bytes(flipped), packet[:-5], packet[:10], b"", b"\x00" * 100, packet + b"x", other_model,
            b"NVCF" + b"\xff" * 60]


def test_corrupt_truncated_and_foreign_packets_are_counted_not_raised(codec):
    other = NeuralCodec.untrained("lite", frame_size=64, seed=1)
    _, foreign = sliced(other, 1, 1)
    asm = FrameAssembler(codec)
    _, good = sliced(codec, 1, 1)
    bad = corrupt_variants(good[0], foreign[0])
    for b in bad:
        assert asm.add(b) == []
    assert asm.n.bad_packets == len(bad) - 1 and asm.n.foreign == 1
    out = []
    for p in good:  # the stream goes on
        out += asm.add(p)
    assert len(out) == 1 and out[0].complete


def test_sender_restart_is_recognised(codec):
    asm = FrameAssembler(codec)
    for n in range(10, 13):
        for p in sliced(codec, n, n, ts=1_000_000 + n)[1]:
            asm.add(p)
    # an old straggler (older capture time): late
    assert asm.add(sliced(codec, 3, 3, ts=1_000_003)[1][0]) == []
    assert asm.n.late == 1
    # a new sender: numbers restart at 0, its clock is newer
    out = []
    for p in sliced(codec, 0, 0, ts=5_000_000)[1]:
        out += asm.add(p)
    assert [f.frame_number for f in out] == [0] and asm.n.restarts == 1


_STREAMS: dict = {}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 20), st.booleans()), max_size=60))
def test_frames_only_move_forward_whatever_arrives(ops):
    if not _STREAMS:  # built once: hypothesis calls this many times
        c = NeuralCodec.untrained("lite", frame_size=64)
        _STREAMS.update({"codec": c, **{n: sliced(c, n, n)[1] for n in range(6)}})
    codec, streams = _STREAMS["codec"], _STREAMS
    asm = FrameAssembler(codec, deadline_s=0.0)
    shown = []
    for n, i, poll in ops:
        ps = streams[n]
        data = ps[i % len(ps)]
        if i >= len(ps) * 2:  # sometimes a damaged copy
            data = data[: len(data) // 2]
        shown += [f.frame_number for f in asm.add(data)]
        if poll:
            shown += [f.frame_number for f in asm.poll()]
    assert shown == sorted(shown) and len(shown) == len(set(shown))
    for f in [*asm.poll()]:
        assert f.latents(codec).shape[1:] == (24, 8, 8)


def test_header_fields_survive(codec):
    _, ps = sliced(codec, 1, 0xFFFFFFFF, ts=2**40)
    asm = FrameAssembler(codec)
    out = []
    for p in ps:
        out += asm.add(p)
    assert out[0].frame_number == 0xFFFFFFFF and out[0].timestamp_us == 2**40
    assert bitstream.header_fields(ps[0])["frame_number"] == 0xFFFFFFFF


# -- bounded work per packet: shapes, frame numbers, pending frames ----------------------------

@pytest.fixture(scope="module")
def shipped() -> NeuralCodec:
    """The shipped default model (range-coded, step mode): what a receiver runs."""
    return NeuralCodec.load()


def reseal(body: bytes) -> bytes:
    return bytes(body) + struct.pack(">I", zlib.crc32(bytes(body)))


def forged(codec: NeuralCodec, coding: int, height: int, width: int, row_count: int, payload: bytes,
           level: int = 3) -> bytes:
    """A valid-CRC packet of `codec`'s model with any latent shape."""
    head = bitstream.header_bytes({"magic_version": bitstream.MAGIC_VERSION, "coding": coding, "bits": codec.bits,
                                   "quant_mode": 2, "level": level, "model_id": codec.model_id, "frame_number": 1,
                                   "channels": 24, "height": height, "width": width, "row_count": row_count})
    return reseal(head + payload)


def refused_cheaply(asm: FrameAssembler, data: bytes) -> int:
    """Feed one packet; its tracemalloc peak (bytes). Asserts it yields nothing."""
    tracemalloc.start()
    try:
        t0 = time.process_time()
        assert asm.add(data) == []
        cpu = time.process_time() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cpu < 0.5  # generous: refusing a packet is microseconds of work, decoding it was seconds
    return peak


def test_forged_huge_latent_shapes_are_refused_as_foreign_without_decoding(shipped):
    """The two attacks found by hand: a 34-byte range-coded packet claiming 24x1024x1024 latents
    (5 s and 4.3 GB before) and a 24,610-byte raw slice of an 8192x8192 frame (35 s, 4.2 GB)."""
    asm = FrameAssembler(shipped)
    assert asm.latent_shape == (24, 28, 28) == shipped.latent_shape()
    ranged = forged(shipped, bitstream.CODING_RANGE, 1024, 1024, 1024, b"")
    raw = forged(shipped, bitstream.CODING_RAW, 1024, 1024, 1, bytes(24 * 1024))
    assert (len(ranged), len(raw)) == (34, 24_610)
    for n, data in enumerate((ranged, raw), 1):
        assert refused_cheaply(asm, data) < 1_000_000
        assert asm.n.foreign == n and asm.n.bad_packets == 0
        assert "latent shape 24x1024x1024 (a 8192x8192 frame); this call expects 24x28x28" in asm.n.last_error
    assert asm._pending == {}
    # a call that does run at 8192x8192 accepts that shape, but a 34-byte packet cannot hold
    # 25 M codes: refused by the range decoder's bound, before decoding anything
    big = FrameAssembler(shipped, latent_shape=(24, 1024, 1024))
    assert refused_cheaply(big, ranged) < 1_000_000
    assert big.n.bad_packets == 1 and "cannot hold" in big.n.last_error


def test_the_calls_frame_size_can_be_set(shipped):
    asm = FrameAssembler(shipped)
    frames = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    packets = shipped.packets(frames, 1, 0, SLICE_BYTES)
    assert all(asm.add(p) == [] for p in packets) and asm.n.foreign == len(packets)
    asm.set_frame_size(256)
    assert asm.latent_shape == (24, 32, 32)
    out = [f for p in packets for f in asm.add(p)]
    assert len(out) == 1 and out[0].complete and out[0].codes.shape == (24, 32, 32)
    with pytest.raises(FrameSizeError):
        asm.set_frame_size(250)
    with pytest.raises(ValueError, match="channels"):
        FrameAssembler(shipped, latent_shape=(12, 28, 28))
    assert FrameAssembler(shipped, latent_shape=(24, 16, 40)).latent_shape == (24, 16, 40)


def test_packets_of_another_quantizer_level_or_bits_are_foreign(codec, shipped):
    asm = FrameAssembler(codec)
    q = codec.encode(frame(1))
    h = bitstream.PacketHeader(codec.model_id, 1, 0, 24, 8, 8, 0, 8, 5, "fixed")
    asm.add(bitstream.pack(h, q.codes & 31))  # 5-bit codes for a 6-bit model
    assert asm.n.foreign == 1 and "bits" in asm.n.last_error
    asm = FrameAssembler(shipped)
    h = bitstream.PacketHeader(shipped.model_id, 1, 0, 24, 28, 28, 0, 28, 8, "step", level=shipped.levels)
    asm.add(bitstream.pack(h, np.zeros((24, 28, 28), np.uint8)))
    assert asm.n.foreign == 1 and "level" in asm.n.last_error and asm.n.bad_packets == 0


def test_forged_frame_numbers_leave_lost_bounded(codec):
    asm = FrameAssembler(codec)
    streams = {n: sliced(codec, n % 3, n)[1] for n in (1, 2, 3)}

    def send(number: int, ts: int, which: int = 1) -> list:
        out = []
        for p in streams[which]:
            out += asm.add(bitstream.rewrite_header(p, frame_number=number, timestamp_us=ts))
        return out

    assert [f.frame_number for f in send(1, 1_000_000)] == [1]
    for forged_number in (2 ** 32 - 1, 7, 2 ** 31, 300_000_000, 2, 4_000_000_000):
        send(forged_number, 2 ** 64 - 1)  # a number far off and a capture time far in the future
        assert asm.n.lost <= MAX_FRAME_GAP * asm.n.packets
    assert asm.n.lost < 2 * MAX_FRAME_GAP and asm.n.restarts >= 4
    # the real stream goes on: a far-off number with a future timestamp does not make it late
    shown = [f.frame_number for n in range(3, 10) for f in send(n, 1_000_000 + n)]
    assert shown == list(range(3, 10))
    lost = asm.n.lost
    send(10 + MAX_FRAME_GAP - 1, 2_000_000)  # a real gap in the window: counted, and bounded
    assert asm.n.lost == lost + MAX_FRAME_GAP - 1
    # a flood of forged numbers, each a far jump: restarts, never millions of lost frames
    lost, rng = asm.n.lost, np.random.default_rng(0)
    for n in rng.integers(0, 2 ** 32, 300):
        send(int(n), int(rng.integers(0, 2 ** 63)))
    assert asm.n.lost - lost < 3 * MAX_FRAME_GAP  # nothing like the 3e11 measured before


def test_a_flood_of_distinct_frame_numbers_keeps_pending_frames_bounded(codec):
    asm = FrameAssembler(codec, deadline_s=1e9)
    first = sliced(codec, 1, 1)[1][0]  # the first slice of a frame: the frame stays open
    tracemalloc.start()
    for n in range(5000, 5000 - MAX_FRAME_GAP, -1):  # newest first: none closes an older one
        asm.add(bitstream.rewrite_header(first, frame_number=n))
        assert len(asm._pending) <= MAX_PENDING
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000
    assert asm.n.late >= MAX_FRAME_GAP - MAX_PENDING


def test_undecoded_concealed_frames_do_not_pile_up(codec):
    asm = FrameAssembler(codec)
    _, ps = sliced(codec, 1, 1)
    frames = []
    for n in range(1, 200):  # every frame loses its middle slices, and nobody decodes them
        for p in ps[:1] + ps[-1:]:
            frames += asm.add(bitstream.rewrite_header(p, frame_number=n))
    assert len(frames) == 199 and all(f.concealed for f in frames)
    depth, node = 0, frames[-1]
    while node._prev is not None:
        depth, node = depth + 1, node._prev
    assert depth < MAX_CONCEAL_CHAIN
    assert frames[-1].latents(codec).shape == (1, 24, 8, 8)


@pytest.mark.parametrize("size", [224, 448])
def test_memory_per_packet_follows_the_actual_latent_shape(shipped, size):
    """A whole range-coded frame costs the decoder's fixed chunk (256 KiB of probabilities) and a
    few bytes per code it actually holds, nothing in proportion to a header's claims."""
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    asm = FrameAssembler(shipped)
    asm.set_frame_size(size)
    (packet,) = shipped.packets(image, 1, 0, level=0)
    tracemalloc.start()
    out = asm.add(packet)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(out) == 1 and out[0].complete
    assert peak < 400_000 + 4 * out[0].codes.size
