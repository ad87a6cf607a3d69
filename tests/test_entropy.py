"""Step-mode quantizer, entropy tables and range-coded packets: exact round trips, sizes near the
ideal code length, a stored golden packet, and typed errors for anything malformed."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.codec import NeuralCodec, bitstream, entropy, weights
from streamer.codec.bitstream import CODING_RANGE, CODING_RAW, pack_frame, unpack
from streamer.codec.entropy import EntropyCoder
from streamer.codec.quantizer import Quantized, Quantizer, QuantizerConfig
from streamer.errors import ConfigError, PacketError, WeightsError

from golden import check_golden

GOLDEN = Path(__file__).parent / "data" / "golden_range_packet.sha256"
STEPS = [0.05, 0.1, 0.2]


def step_quantizer(channels: int = 4, seed: int = 0) -> tuple[Quantizer, torch.Tensor]:
    torch.manual_seed(seed)
    q = Quantizer(QuantizerConfig(bits=8, mode="step", steps=STEPS, level=1), channels)
    y = torch.randn(8, channels, 6, 6) * torch.tensor([3.0, 1.0, 0.3, 0.1])[:channels].view(1, -1, 1, 1)
    q.calibrate(y, coverage=1.0)
    return q, y


def laplace_codes(rng: np.random.Generator, sizes: np.ndarray, shape: tuple[int, int, int], scale: float = 4.0) -> np.ndarray:
    """Codes peaked at each channel's middle (as latents around 0 are), inside the alphabet."""
    c, h, w = shape
    mid = (sizes // 2)[:, None, None]
    x = np.rint(rng.laplace(0, scale, (c, h, w))).astype(np.int64) + mid
    return np.clip(x, 0, sizes[:, None, None] - 1).astype(np.uint8)


def coder_for(sizes: np.ndarray, seed: int = 0) -> EntropyCoder:
    rng = np.random.default_rng(seed)
    zero = sizes // 2
    counts = entropy.fit(laplace_codes(rng, sizes, (len(sizes), 64, 64))[None], sizes, zero)
    return EntropyCoder(counts[None], [sizes], [zero])


# -- the step-mode quantizer ------------------------------------------------------------------

def test_step_grid_holds_zero_and_fits_the_alphabet():
    q, y = step_quantizer()
    for lv, step in enumerate(STEPS):
        first, count, s = q.grid(lv)
        assert s == step and (count <= 256).all() and (first <= 0).all() and (first + count - 1 >= 0).all()
        # a range wider than 256 steps keeps its central 256 (channel 0 at the finest step)
    assert q.grid(0)[1][0] == 256
    zeros = q.quantize(torch.zeros(1, 4, 2, 2), 1)[0].codes
    assert torch.equal(q.dequantize_codes(torch.from_numpy(zeros).float(), 1),
                       torch.zeros(4, 2, 2))  # latent 0 survives quantization exactly


@pytest.mark.parametrize("level", [0, 1, 2])
def test_step_forward_equals_what_a_receiver_dequantizes(level):
    q, y = step_quantizer()
    qs = q.quantize(y, level)
    back = torch.stack([q.dequantize_codes(torch.from_numpy(r.codes).float(), level) for r in qs])
    assert torch.equal(back, q(y, level))
    assert all(r.level == level and r.mode == "step" for r in qs)
    inside = (y > q.lo.view(1, -1, 1, 1) + STEPS[level]) & (y < q.hi.view(1, -1, 1, 1) - STEPS[level])
    inside[:, 0] &= level > 0  # channel 0 is clipped to 256 steps at the finest level
    assert ((back - y).abs()[inside] <= STEPS[level] / 2 + 1e-5).all()


def test_step_config_is_validated():
    with pytest.raises(ConfigError, match="positive steps"):
        QuantizerConfig(mode="step", steps=[]).validate()
    with pytest.raises(ConfigError, match="positive steps"):
        QuantizerConfig(mode="step", steps=[0.1, -1.0]).validate()
    with pytest.raises(ConfigError, match="level"):
        QuantizerConfig(mode="step", steps=[0.1], level=1).validate()
    q, y = step_quantizer()
    with pytest.raises(ConfigError, match="level"):
        q.quantize(y, 3)
    # fixed-mode configs serialize as before (their model ids must not change)
    assert set(QuantizerConfig(bits=6).to_dict()) == {"bits", "mode", "lo", "hi"}


# -- the entropy coder ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 1, 1), (4, 3, 28), (4, 28, 28)])
def test_range_coding_round_trips_near_the_ideal_length(shape):
    sizes = np.array([256, 120, 40, 7])
    coder = coder_for(sizes)
    codes = laplace_codes(np.random.default_rng(1), sizes, shape)
    payload = coder.encode(codes, 0)
    assert len(payload) % 4 == 0
    assert np.array_equal(coder.decode(payload, shape, 0), codes)
    ideal = coder.estimate_bits(codes, 0).sum() / 8
    assert len(payload) <= ideal * 1.01 + 8  # within 1 % and the coder's final words


def test_contexts_read_the_row_above_and_mark_first_rows():
    zero = np.array([5])
    codes = np.full((1, 3, 4), 5, np.uint8)
    codes[0, 0, 1] = 5 + 3  # |value| 3 in the first row
    ctx = entropy.contexts(codes, zero)
    assert (ctx[0, 0] == entropy.FIRST_ROW).all()  # a slice's first row has nothing above
    # row 1: columns 0, 1, 2 see the 3 above them (log2(1 + 3) = 2); column 3 sees nothing
    assert ctx[0, 1].tolist() == [2, 2, 2, 0] and ctx[0, 2].tolist() == [0, 0, 0, 0]
    big = np.full((1, 2, 1), 255, np.uint8)
    assert entropy.contexts(big, np.array([0]))[0, 1, 0] == entropy.ACTIVITY_BUCKETS - 1  # capped


def test_context_tables_beat_one_table_on_correlated_codes():
    """Codes whose spread varies smoothly across the picture (as latents do): the activity
    context must pay for itself."""
    rng = np.random.default_rng(2)
    sizes, zero = np.array([256]), np.array([128])
    scale = np.repeat(np.repeat(rng.choice([0.3, 3.0, 12.0], (1, 8, 8)), 8, 1), 8, 2)
    codes = lambda: np.clip(np.rint(rng.laplace(0, 1, (1, 64, 64)) * scale) + 128, 0, 255).astype(np.uint8)
    counts = entropy.fit(np.stack([codes() for _ in range(8)]), sizes, zero)
    flat = counts.sum(axis=1, keepdims=True).repeat(entropy.CONTEXTS, axis=1)  # one table for all
    test = codes()
    with_ctx = EntropyCoder(counts[None], [sizes], [zero])
    without = EntropyCoder(flat[None], [sizes], [zero])
    assert len(with_ctx.encode(test, 0)) < 0.95 * len(without.encode(test, 0))  # measured: 0.936


def test_codes_the_training_set_never_produced_stay_encodable():
    sizes = np.array([10, 10])
    counts = np.zeros((1, 2, entropy.CONTEXTS, 256), np.int64)
    counts[0, :, :, 5] = 1000  # training only ever saw code 5
    coder = EntropyCoder(counts, [sizes], [sizes // 2])
    codes = np.array([[[0, 9, 5]], [[5, 5, 1]]], np.uint8)
    assert np.array_equal(coder.decode(coder.encode(codes, 0), codes.shape, 0), codes)
    with pytest.raises(ValueError, match="alphabet"):
        coder.encode(np.full((2, 1, 1), 10, np.uint8), 0)


def test_decoder_errors_are_typed():
    coder = coder_for(np.array([256, 120, 40, 7]))
    with pytest.raises(PacketError, match="32-bit words"):
        coder.decode(b"\x01\x02\x03", (4, 2, 2), 0)
    with pytest.raises(PacketError, match="level"):
        coder.decode(b"", (4, 2, 2), 1)
    with pytest.raises(PacketError, match="channels"):
        coder.decode(b"", (3, 2, 2), 0)
    with pytest.raises(WeightsError, match="shape"):
        EntropyCoder(np.zeros((1, 4, 100)), [np.array([1, 1, 1, 1])], [np.zeros(4)])


# -- range-coded packets ----------------------------------------------------------------------

def step_frame(seed: int = 0, shape=(4, 28, 28), level: int = 0) -> tuple[Quantized, EntropyCoder]:
    sizes = np.array([256, 120, 40, 7])
    codes = laplace_codes(np.random.default_rng(seed), sizes, shape)
    lo = np.zeros(4, np.float32)
    return Quantized(codes, lo, lo, 8, "step", level), coder_for(sizes)


def test_packer_range_codes_when_smaller_and_slices_decode_alone():
    q, coder = step_frame()
    (whole,) = pack_frame(q, 9, 1, 2, coder=coder)
    (raw,) = pack_frame(q, 9, 1, 2)
    p = unpack(whole, 9, coder)
    assert p.header.coding == CODING_RANGE and len(whole) < 0.6 * len(raw)
    assert np.array_equal(p.codes, q.codes)
    slices = pack_frame(q, 9, 1, 2, max_packet_bytes=bitstream.SCTP_CHUNK_BYTES, coder=coder)
    assert len(slices) > 1 and all(len(s) <= bitstream.SCTP_CHUNK_BYTES for s in slices)
    for s in slices:  # each slice on its own, as after a loss
        ps = unpack(s, 9, coder)
        rows = slice(ps.header.row_start, ps.header.row_start + ps.header.row_count)
        assert ps.header.coding == CODING_RANGE and np.array_equal(ps.codes, q.codes[:, rows])


def test_packer_falls_back_to_raw_codes_when_the_tables_fit_badly():
    sizes = np.array([256, 120, 40, 7])
    counts = np.zeros((1, 4, entropy.CONTEXTS, 256), np.int64)
    counts[0, np.arange(4), :, sizes // 2] = 10 ** 6  # training only ever saw latent 0
    coder = EntropyCoder(counts, [sizes], [sizes // 2])
    rng = np.random.default_rng(3)  # uniform over each alphabet: nothing like the training codes
    codes = np.stack([rng.integers(0, n, (28, 28)) for n in sizes]).astype(np.uint8)
    q = Quantized(codes, np.zeros(4, np.float32), np.zeros(4, np.float32), 8, "step", 0)
    for limit in (None, bitstream.SCTP_CHUNK_BYTES):
        packets = pack_frame(q, 9, 1, 2, max_packet_bytes=limit, coder=coder)
        parts = [unpack(p, 9, coder) for p in packets]
        assert all(p.header.coding == CODING_RAW for p in parts)
        assert all(len(p) <= (limit or bitstream.MAX_PACKET_BYTES) for p in packets)
        assert np.array_equal(np.concatenate([p.codes for p in parts], axis=1), codes)


def test_range_coded_packet_needs_tables_and_a_sane_length():
    q, coder = step_frame()
    (good,) = pack_frame(q, 9, 1, 2, coder=coder)
    with pytest.raises(PacketError, match="entropy tables"):
        unpack(good, 9)

    def reseal(body: bytearray) -> bytes:
        return bytes(body) + struct.pack(">I", zlib.crc32(bytes(body)))

    body = bytearray(good[:-4])
    with pytest.raises(PacketError, match="whole words"):  # a payload one byte short of whole words
        unpack(reseal(body[:-1]), 9, coder)
    fixed = bitstream.rewrite_header(good, quant_mode=0, level=1)  # a level in a fixed-mode packet
    with pytest.raises(PacketError, match="level"):
        unpack(fixed, 9, coder)


def test_golden_range_coded_packet_is_stable():
    """Tables + codes -> bytes is a contract between sender and receiver builds (and versions
    of the range coder): a change must be deliberate. The expected digest is
    tests/data/golden_range_packet.sha256: a missing file fails; only UPDATE_GOLDEN=1
    (re)writes it (see `check_golden`)."""
    q, coder = step_frame(seed=5, level=0)
    (packet,) = pack_frame(q, 0x01020304, 9, 1_700_000_000_000_000, coder=coder)
    check_golden(GOLDEN, hashlib.sha256(packet).hexdigest())


_Q, _CODER = step_frame(seed=7, shape=(4, 6, 6))
VALID = pack_frame(_Q, 77, 3, 10 ** 12, coder=_CODER) + pack_frame(_Q, 77, 4, 10 ** 12, max_packet_bytes=120, coder=_CODER)


@settings(max_examples=3_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(which=st.integers(0, len(VALID) - 1), pos=st.integers(0, 10 ** 6), val=st.integers(1, 255),
       cut=st.booleans())
def test_mutated_range_coded_packets_raise_the_typed_error_only(which, pos, val, cut):
    b = bytearray(VALID[which])
    if cut:
        del b[pos % len(b):]
    else:
        b[pos % len(b)] ^= val
    with pytest.raises(PacketError):
        unpack(bytes(b), 77, _CODER)


# -- weights carry the tables -----------------------------------------------------------------

def test_tables_travel_with_the_weights_and_change_the_model_id(tmp_path):
    codec = NeuralCodec.untrained("lite", bits=8, mode="fixed", frame_size=32, latent_channels=4,
                                  width1=4, width2=8)
    codec.cfg.quantizer = QuantizerConfig(bits=8, mode="step", steps=STEPS, level=1,
                                          lo=codec.cfg.quantizer.lo, hi=codec.cfg.quantizer.hi)
    codec = NeuralCodec(codec.cfg, codec.model, 0)
    frames = (np.random.default_rng(0).random((6, 32, 32, 3)) * 255).astype(np.uint8)
    y = codec.model.encoder(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    counts = entropy.fit_levels(codec.quantizer, y)
    codec.set_entropy_counts(counts)
    weights.save(tmp_path / "m", codec.cfg, codec.model)
    loaded = NeuralCodec.load(tmp_path / "m.json")
    assert np.array_equal(loaded.cfg.entropy_counts, counts) and loaded.entropy is not None
    codec.set_entropy_counts(None)
    weights.save(tmp_path / "plain", codec.cfg, codec.model)
    assert NeuralCodec.load(tmp_path / "plain.json").model_id != loaded.model_id
    packets = loaded.packets(frames[0], 0, 0)
    assert np.array_equal(np.concatenate([loaded.unpack(p).codes for p in packets], axis=1),
                          loaded.encode(frames[0]).codes)
    with pytest.raises(WeightsError, match="expected"):
        codec.set_entropy_counts(counts[:2])


# -- bounded work per packet ------------------------------------------------------------------

def most_probable_codes(coder: EntropyCoder, level: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The cheapest codes there are: each the most probable symbol of its table in its context."""
    c, h, w = shape
    out = np.zeros(shape, np.uint8)
    ctx = np.full((c, w), entropy.FIRST_ROW)
    for r in range(h):
        out[:, r] = coder.probs[level][np.arange(c)[:, None], ctx].argmax(axis=2)
        if r + 1 < h:
            ctx = entropy.contexts(out[:, r:r + 2], coder.zeros[level])[:, 1]
    return out


def shipped_coder() -> EntropyCoder | None:
    try:
        return NeuralCodec.load().entropy
    except WeightsError:
        return None


@pytest.mark.parametrize("shape", [(4, 28, 28), (4, 1, 28), (4, 1, 1), (4, 3, 300)])
def test_the_payload_bound_admits_everything_the_encoder_makes(shape):
    """Even the cheapest codes (every one its table's most probable) fit the bound on codes per
    payload byte, at every level of the shipped tables; rows wider than one decoder chunk
    decode exactly too."""
    coders = [(coder_for(np.array([256, 120, 40, 7])), range(1))]
    shipped = shipped_coder()
    if shipped is not None:
        coders.append((shipped, range(shipped.levels)))
    for coder, levels in coders:
        c = coder.channels
        for level in levels:
            s = (c, *shape[1:])
            for codes in (most_probable_codes(coder, level, s),
                          laplace_codes(np.random.default_rng(level), coder.sizes[level], s, scale=0.3)):
                payload = coder.encode(codes, level)
                assert codes.size <= coder.max_codes(len(payload), level, c)
                assert np.array_equal(coder.decode(payload, s, level), codes)


def test_a_short_payload_claiming_many_codes_never_reaches_the_decoder():
    import tracemalloc

    coder = coder_for(np.array([256, 120, 40, 7]))
    for payload in (b"", b"\0" * 8, b"\xff" * 4000):
        tracemalloc.start()
        with pytest.raises(PacketError, match="cannot hold"):
            coder.decode(payload, (4, 1024, 1024), 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 100_000
    big = b"\0" * 200_000  # long enough for the bound, but over the cap on codes per payload
    with pytest.raises(PacketError, match="cannot hold"):
        coder.decode(big, (4, 1024, 1024), 0)
    assert coder.max_codes(10 ** 9, 0, 4) == entropy.MAX_DECODE_CODES
    # through the parser: a valid-CRC 34-byte range-coded header claiming 4x1024x1024 latents
    head = bitstream.header_bytes({"magic_version": bitstream.MAGIC_VERSION, "coding": CODING_RANGE, "bits": 8,
                                   "quant_mode": 2, "model_id": 9, "frame_number": 1, "channels": 4,
                                   "height": 1024, "width": 1024, "row_count": 1024})
    forged = head + struct.pack(">I", zlib.crc32(head))
    assert len(forged) == 34
    tracemalloc.start()
    with pytest.raises(PacketError, match="cannot hold"):
        unpack(forged, 9, coder)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100_000


def test_range_coded_slices_hold_at_most_what_a_receiver_decodes(monkeypatch):
    q, coder = step_frame()
    monkeypatch.setattr(entropy, "MAX_DECODE_CODES", 4 * 5 * 28)  # 5 rows of (4, 28, 28)
    monkeypatch.setattr(bitstream, "MAX_DECODE_CODES", 4 * 5 * 28)
    packets = pack_frame(q, 9, 1, 2, coder=coder)
    parts = [unpack(p, 9, coder) for p in packets]
    assert len(parts) == 6 and all(p.header.row_count <= 5 for p in parts)
    assert np.array_equal(np.concatenate([p.codes for p in parts], axis=1), q.codes)
