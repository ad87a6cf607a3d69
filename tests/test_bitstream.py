"""Packet format: bit packing, round trips, slices, a stored golden packet, and a strict parser."""

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.codec import bitstream
from streamer.codec.bitstream import PacketHeader, pack, pack_bits, pack_frame, unpack, unpack_bits
from streamer.codec.quantizer import Quantized
from streamer.errors import PacketError

from golden import check_golden

GOLDEN = Path(__file__).parent / "data" / "golden_packet.sha256"


def quantized(channels=24, height=28, width=28, bits=6, mode="fixed", seed=0) -> Quantized:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (channels, height, width), dtype=np.uint8)
    lo = np.linspace(-3, -1, channels).astype(np.float16).astype(np.float32)
    hi = np.linspace(1, 3, channels).astype(np.float16).astype(np.float32)
    return Quantized(codes, lo, hi, bits, mode)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 3, 8, 9, 1001, 18816])
def test_pack_bits_round_trip_and_reference(bits, count):
    codes = np.random.default_rng(bits * 7 + count).integers(0, 1 << bits, count, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == (count * bits + 7) // 8  # n-bit codes take exactly n bits
    # independent reference: NumPy's bit arrays, MSB first
    ref = np.packbits(np.unpackbits(codes[:, None], axis=1)[:, 8 - bits:].reshape(-1)).tobytes()
    assert packed == ref
    assert np.array_equal(unpack_bits(packed, count, bits), codes)


@pytest.mark.parametrize("mode", ["fixed", "minmax"])
@pytest.mark.parametrize("bits", [1, 3, 6, 8])
def test_whole_frame_round_trip(mode, bits):
    q = quantized(bits=bits, mode=mode)
    (packet,) = pack_frame(q, model_id=0xDEADBEEF, frame_number=42, timestamp_us=123_456_789)
    p = unpack(packet, expect_model_id=0xDEADBEEF)
    assert np.array_equal(p.codes, q.codes)
    h = p.header
    assert (h.frame_number, h.timestamp_us, h.bits, h.quant_mode) == (42, 123_456_789, bits, mode)
    assert (h.channels, h.height, h.width, h.row_start, h.row_count) == (24, 28, 28, 0, 28)
    if mode == "minmax":
        assert np.array_equal(p.lo, q.lo) and np.array_equal(p.hi, q.hi)
    else:
        assert p.lo is None


def test_slices_fit_one_sctp_chunk_and_reassemble():
    q = quantized()
    packets = pack_frame(q, 1, 7, 0, max_packet_bytes=bitstream.SCTP_CHUNK_BYTES)
    assert len(packets) > 1 and all(len(p) <= bitstream.SCTP_CHUNK_BYTES for p in packets)
    parts = [unpack(p) for p in packets]
    assert [p.header.row_start for p in parts] == sorted(p.header.row_start for p in parts)
    assert np.array_equal(np.concatenate([p.codes for p in parts], axis=1), q.codes)


def test_compression_ratio_matches_seed_definition():
    # 24 channels x 6 bits per 8x8 block: 144 bits per 64 pixels = 2.25 bpp -> 24 / 2.25
    assert bitstream.payload_compression_ratio(24, 6) == pytest.approx(10.6667, abs=1e-4)
    (packet,) = pack_frame(quantized(), 1, 0, 0)
    assert len(packet) == 24 * 28 * 28 * 6 // 8 + bitstream.OVERHEAD_BYTES
    cr = bitstream.compression_ratio(len(packet), 224, 224)
    assert 10.6 < cr < 10.67  # the header costs a little


def test_golden_packet_bytes_are_stable():
    """The wire format is a contract: a change to it must be deliberate (bump VERSION). The
    expected digest is tests/data/golden_packet.sha256: a missing file fails; only
    UPDATE_GOLDEN=1 (re)writes it (see `check_golden`)."""
    (packet,) = pack_frame(quantized(seed=1, mode="minmax"), 0x01020304, 9, 1_700_000_000_000_000)
    check_golden(GOLDEN, hashlib.sha256(packet).hexdigest())


def test_parser_rejects_foreign_version_model_and_shape():
    (good,) = pack_frame(quantized(), 5, 0, 0)
    with pytest.raises(PacketError, match="model"):
        unpack(good, expect_model_id=6)

    def reseal(body: bytes) -> bytes:
        return body + struct.pack(">I", zlib.crc32(body))

    # versions 1 and 2 began with b"NVCF" and the version byte; a v2 header of the same slice
    legacy = reseal(b"NVCF" + bytes([2]) + bytes(37) + good[bitstream.HEADER_BYTES:-4])
    with pytest.raises(PacketError, match="version 2; this decoder reads version 4"):
        unpack(legacy)
    body = bytearray(good[:-4])
    body[0] = 0xA5  # a later version of this format
    with pytest.raises(PacketError, match="version 5; this decoder reads version 4"):
        unpack(reseal(bytes(body)))
    body[0] = 0xA3  # version 3: its header, but residuals coded in one pass
    with pytest.raises(PacketError, match="version 3; this decoder reads version 4"):
        unpack(reseal(bytes(body)))
    body[:4] = b"RIFF"
    with pytest.raises(PacketError, match="not a frame packet"):
        unpack(reseal(bytes(body)))
    body = bytearray(good[:-4])
    body[1] |= 1  # the conditional flag on an intra slice: only whole learned P-frames have it
    with pytest.raises(PacketError, match="conditional packet is a whole inter frame"):
        unpack(reseal(bytes(body)))
    with pytest.raises(PacketError, match="truncated"):
        unpack(good[:-1])
    with pytest.raises(PacketError, match="oversized|truncated"):
        unpack(good + b"\0")
    with pytest.raises(PacketError, match="over the"):
        unpack(b"\0" * (bitstream.MAX_PACKET_BYTES + 1))
    with pytest.raises(PacketError, match="checksum"):
        corrupt = bytearray(good)
        corrupt[100] ^= 0x10
        unpack(bytes(corrupt))
    with pytest.raises(PacketError):
        unpack("not bytes")  # type: ignore[arg-type]


def test_pack_refuses_inconsistent_input():
    q = quantized()
    h = PacketHeader(1, 0, 0, 24, 28, 28, 0, 28, 6, "minmax")
    with pytest.raises(ValueError):
        pack(h, q.codes[:, :3], q.lo, q.hi)
    with pytest.raises(ValueError):
        pack(h, q.codes)  # minmax needs side information


VALID = [pack_frame(quantized(channels=c, height=h, width=w, bits=b, mode=m, seed=i), 77, i, 10 ** 12 + i, mx)
         for i, (c, h, w, b, m, mx) in enumerate([(24, 4, 4, 6, "fixed", None), (3, 5, 7, 3, "minmax", None),
                                                  (8, 6, 6, 8, "fixed", 200), (24, 28, 28, 6, "minmax", 1160)])]
VALID = [p for packets in VALID for p in packets]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 6), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10 ** 6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10 ** 6), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 64), st.integers(0, 255)),
)


def mutate(packet: bytes, ops) -> bytes:
    b = bytearray(packet)
    for kind, pos, val in ops:
        i = pos % (len(b) + 1)
        if kind == "flip" and b:
            b[i % len(b)] ^= val
        elif kind == "set" and b:
            b[i % len(b)] = val
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b.insert(i, val)
        elif kind == "delete" and b:
            del b[i % len(b)]
        elif kind == "append":
            b.extend([val] * pos)
    return bytes(b)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(which=st.integers(0, len(VALID) - 1), ops=st.lists(mutation, min_size=1, max_size=4))
def test_parser_rejects_mutations_with_the_typed_error_only(which, ops):
    original = VALID[which]
    data = mutate(original, ops)
    try:
        packet = unpack(data, expect_model_id=77)
    except PacketError:
        return
    # only a mutation that changed nothing may parse (CRC32 guards the rest)
    assert data == original, "a mutated packet was accepted"
    assert packet.header.model_id == 77


@settings(max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.binary(max_size=300))
def test_parser_rejects_random_bytes(data):
    with pytest.raises(PacketError):
        unpack(data)


def test_a_missing_golden_file_fails_and_only_the_flag_writes_it(tmp_path, monkeypatch):
    path = tmp_path / "golden.sha256"
    monkeypatch.delenv("UPDATE_GOLDEN", raising=False)
    with pytest.raises(pytest.fail.Exception, match="missing"):
        check_golden(path, "ab" * 32)
    assert not path.exists()
    monkeypatch.setenv("UPDATE_GOLDEN", "1")
    check_golden(path, "ab" * 32)
    monkeypatch.delenv("UPDATE_GOLDEN")
    check_golden(path, "ab" * 32)
    with pytest.raises(AssertionError):
        check_golden(path, "cd" * 32)
    assert GOLDEN.exists()  # the committed expectation is there


def reseal(body: bytes) -> bytes:
    return bytes(body) + struct.pack(">I", zlib.crc32(bytes(body)))


def test_expected_shape_refuses_other_shapes_before_the_payload():
    q = quantized()
    (good,) = pack_frame(q, 5, 0, 0)
    assert unpack(good, expect_shape=(24, 28, 28)).header.height == 28
    with pytest.raises(bitstream.ForeignPacketError, match="latent shape 24x28x28.*expects 24x32x32"):
        unpack(good, expect_shape=(24, 32, 32))
    # a valid-CRC raw slice of an 8192x8192 frame: refused on its header, nothing decoded
    head = bitstream.header_bytes({"magic_version": bitstream.MAGIC_VERSION, "bits": 8, "quant_mode": 2,
                                   "level": 3, "model_id": 5, "frame_number": 1, "channels": 24, "height": 1024,
                                   "width": 1024, "row_start": 0, "row_count": 1})
    forged = reseal(head + bytes(24 * 1024))
    assert len(forged) == 24_610
    seen = []
    with pytest.raises(bitstream.ForeignPacketError, match="1024x1024 .a 8192x8192 frame"):
        unpack(forged, expect_shape=(24, 28, 28), check_header=seen.append)
    assert seen == []  # refused before the header check hook, let alone the payload
    # decided from the header alone: the CRC is not even computed for it
    with pytest.raises(bitstream.ForeignPacketError, match="expects 24x28x28"):
        unpack(forged[:-1] + bytes([forged[-1] ^ 1]), expect_shape=(24, 28, 28))
    with pytest.raises(PacketError, match="checksum"):  # the shape it expects: then the CRC counts
        unpack(forged[:-1] + bytes([forged[-1] ^ 1]), expect_shape=(24, 1024, 1024))
    # the hook sees packets of the expected shape and can refuse them as foreign
    def refuse(h):
        raise bitstream.ForeignPacketError(f"not for us: {h.bits} bits")
    with pytest.raises(bitstream.ForeignPacketError, match="not for us: 6 bits"):
        unpack(good, expect_shape=(24, 28, 28), check_header=refuse)
