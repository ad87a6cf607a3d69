"""A few thousand hostile packets (fixed seed) into the parser and the assembler, as
`python -m streamer.bench fuzz` sends 100k: no crash, bounded memory per input. Time is the
bench's to report, not asserted here (shared machines)."""

import pytest

from streamer.assembler import MAX_FRAME_GAP, MAX_PENDING
from streamer.bench import fuzz
from streamer.codec import NeuralCodec


@pytest.fixture(scope="module")
def fuzzed() -> fuzz.Fuzzer:
    fz = fuzz.Fuzzer(NeuralCodec.load(), seed=1234, memory_every=10)
    fz.run(3000)
    return fz


def test_no_input_crashes_the_parser_or_the_assembler(fuzzed):
    r = fuzzed.report()
    assert r["inputs"] == 3000
    assert r["crashes"] == 0, r["crash_notes"]
    assert all(r["kinds"][k] > 0 for k in fuzz.KINDS), r["kinds"]
    assert r["frames_emitted"] > 0  # the legitimate stream got through the noise


def test_memory_per_input_is_bounded(fuzzed):
    r = fuzzed.report()
    assert r["memory_measured"] >= 300
    assert r["peak_memory_bytes"] <= fuzz.TARGET_PEAK_BYTES, (r["peak_memory_bytes"], r["peak_memory_kind"])


def test_counters_and_pending_frames_stay_bounded(fuzzed):
    n = fuzzed.asm.n
    assert len(fuzzed.asm._pending) <= MAX_PENDING
    assert n.lost <= MAX_FRAME_GAP * (n.complete + n.concealed)
    assert n.packets == 3000  # every input reached the one assembler (those measured for memory too)


def test_the_attacks_found_by_hand_are_among_the_inputs():
    codec = NeuralCodec.load()
    assert len(fuzz.attack_range_packet(codec.model_id)) == 34
    assert len(fuzz.attack_raw_slice(codec.model_id)) == 24_610
    corpus = fuzz.Corpus(codec, fuzz.sample_frames(codec.frame_size, 2))
    assert fuzz.attack_range_packet(codec.model_id) in corpus.foreign
