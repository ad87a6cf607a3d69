"""Slices -> frames: completeness, concealment, ordering, bad packets, sender restarts."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.assembler import FrameAssembler, codes_crc
from streamer.codec import NeuralCodec, bitstream
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
    assert struct.unpack(">I", ps[0][14:18])[0] == 0xFFFFFFFF
