"""The sender's P-frame decision (streamer/codec/decision.py, EncoderSession's
decision_threshold): what it may change, that off is the old encoder byte for byte, that both
ends stay in lock-step with it on, and that it makes P-frames smaller."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.codec import NeuralCodec, residual
from streamer.codec.decision import keep_reference, unrounded_codes
from streamer.errors import ConfigError
from streamer.session import DEFAULT_DECISION_THRESHOLD, DecoderSession, EncoderSession, FrameType
from streamer.sources import prepare
from streamer.video import SAMPLE_CLIP, read_frames

SLICE = 1160


@pytest.fixture(scope="module")
def codec() -> NeuralCodec:
    return NeuralCodec.load()


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [prepare(f, 224) for f in read_frames(SAMPLE_CLIP, 12)]


def random_case(seed: int, n: int = 16, shape=(4, 6, 7)):
    """Unrounded codes, their codes (rounded, clipped to 0..n-1) and a nearby prediction."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1.5, n + 0.5, shape)
    codes = np.clip(np.rint(u), 0, n - 1).astype(np.uint8)
    prediction = np.clip(codes.astype(int) + rng.integers(-2, 3, shape), 0, n - 1).astype(np.uint8)
    return u, codes, prediction


# -- the pure decision ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.55, 0.8, 1.0, 1.4])
def test_a_decided_code_is_its_own_or_the_prediction_within_the_threshold(seed, threshold):
    u, codes, prediction = random_case(seed)
    sent = keep_reference(codes, u, prediction, threshold)
    assert sent.dtype == np.uint8 and sent.shape == codes.shape
    changed = sent != codes
    assert changed.any()  # the cases have latents near their predictions
    assert np.array_equal(sent[changed], prediction[changed])  # a change is always to the prediction
    assert (np.abs(u - sent)[changed] <= threshold).all()  # ... whose latent error is under the threshold
    assert (np.abs(sent.astype(int) - codes) <= 1).all()  # one code at most (threshold < 1.5)
    near = np.abs(u - prediction) <= threshold
    assert np.array_equal(sent == prediction, near | (codes == prediction))  # everywhere it may, it does


def test_no_threshold_or_one_under_half_a_step_changes_nothing():
    u, codes, prediction = random_case(7)
    for threshold in (None, 0, 0.0, -1.0):
        assert keep_reference(codes, u, prediction, threshold) is codes
    assert np.array_equal(keep_reference(codes, u, prediction, 0.49), codes)


def test_a_larger_threshold_sends_more_zero_residuals():
    u, codes, prediction = random_case(3, shape=(8, 16, 16))
    zeros = [int((keep_reference(codes, u, prediction, t) == prediction).sum()) for t in (0, 0.6, 0.8, 1.0, 1.4)]
    assert zeros == sorted(zeros) and zeros[-1] > zeros[0]


def test_shapes_must_agree():
    u, codes, prediction = random_case(0)
    with pytest.raises(ValueError, match="shapes"):
        keep_reference(codes, u[:, :-1], prediction, 0.8)


def test_unrounded_codes_round_to_the_quantizers_codes(codec, frames):
    for level in (0, 3, 8):
        latents, q = codec.encode_with_latents(frames[0], level)
        assert np.array_equal(q.codes, codec.encode(frames[0], level).codes)  # one pass, the same codes
        u = unrounded_codes(codec.quantizer, latents, level)
        n = codec.quantizer.alphabet(level)[0][:, None, None]
        assert np.array_equal(np.clip(np.rint(u), 0, n - 1).astype(np.uint8), q.codes)


# -- in the session -------------------------------------------------------------------------------

def run(codec, frames, threshold, levels=None):
    s = EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0, decision_threshold=threshold)
    out = []
    for n, f in enumerate(frames):
        cand = s.encode(f, n, n * 33_333, level=None if levels is None else levels[n % len(levels)])
        s.commit(cand)
        out.append(cand)
    return out


def test_off_is_the_encoder_without_the_decision_byte_for_byte(codec, frames):
    """0 and None: every packet as the plain nearest-code encoder makes it."""
    levels = [3, 3, 5, 2, 3, 3]
    plain = []
    ref = None
    for n, f in enumerate(frames[:6]):
        q = codec.encode(f, levels[n])
        if ref is None:
            plain.append(codec.pack(q, n, n * 33_333, SLICE))
        else:
            pred = codec.quantizer.requantize(ref.codes, ref.level, q.level)
            plain.append(codec.pack_inter(q, residual.residuals(q.codes, pred), n, n * 33_333, SLICE))
        ref = q
    for threshold in (0, None):
        assert [c.packets for c in run(codec, frames[:6], threshold, levels)] == plain, threshold
    assert [c.packets for c in run(codec, frames[:6], 0.8, levels)][1:] != plain[1:]  # on: it does change


@pytest.mark.parametrize("threshold", [DEFAULT_DECISION_THRESHOLD, 1.2])
def test_encoder_and_an_offline_decoder_stay_in_lock_step_with_the_decision(codec, frames, threshold):
    """The reference after every frame is the decided codes at both ends, and the receiver shows
    exactly what they decode to, across level changes."""
    enc, dec = (EncoderSession(codec, max_packet_bytes=SLICE, keyframe_interval=0, decision_threshold=threshold),
                DecoderSession(codec))
    levels = [3, 3, 3, 4, 2, 3, 3, 6, 6, 1, 3, 3]
    changed = 0
    for n, f in enumerate(frames):
        cand = enc.encode(f, n, n * 33_333, level=levels[n])
        enc.commit(cand)
        image = dec.decode(cand.packets)
        assert dec.last is not None and dec.last.frame_number == n and not dec.needs_keyframe
        assert np.array_equal(dec.last.codes, enc.reference.codes), n  # the references are identical
        assert np.array_equal(enc.reference.codes, cand.q.codes)
        assert np.array_equal(image, codec.decode(cand.q)), n
        if cand.frame_type == FrameType.INTER:
            changed += int((cand.q.codes != codec.encode(f, levels[n]).codes).sum())
    assert changed > 0  # the decision was really on


def test_decided_p_frames_are_smaller_and_close_to_the_nearest_codes(codec, frames):
    off, on = run(codec, frames, 0), run(codec, frames, DEFAULT_DECISION_THRESHOLD)
    size = lambda cands: sum(sum(map(len, c.packets)) for c in cands if c.frame_type == FrameType.INTER)
    assert on[0].packets == off[0].packets  # the I-frame is untouched
    assert size(on) < 0.85 * size(off), (size(on), size(off))
    for c in on[1:]:
        nearest = codec.encode(frames[c.frame_number], c.q.level).codes
        assert (np.abs(c.q.codes.astype(int) - nearest) <= 1).all()


def test_the_threshold_option_is_checked(codec):
    assert EncoderSession(codec).decision_thresholds == [DEFAULT_DECISION_THRESHOLD] * codec.levels
    assert EncoderSession(codec, decision_threshold=None).decision_thresholds == [0.0] * codec.levels
    per_level = [0.0] * (codec.levels - 1) + [0.9]
    assert EncoderSession(codec, decision_threshold=per_level).decision_thresholds == per_level
    for bad in (1.5, -0.1, [0.8] * (codec.levels + 1), "x"):
        with pytest.raises(ConfigError, match="decision_threshold"):
            EncoderSession(codec, decision_threshold=bad)


# -- the measurement tools' options ---------------------------------------------------------------

def test_the_video_evaluation_passes_the_threshold_to_the_sessions(codec):
    from streamer.errors import StreamerError
    from training import video_eval as V

    assert V.parse_threshold("default") == "default"
    assert V.parse_threshold("0.7") == 0.7 and V.parse_threshold("0") == 0.0
    assert V.parse_threshold("0.7,0.8") == [0.7, 0.8]
    for bad in ("1.5", "-1", "x", ""):
        with pytest.raises(StreamerError, match="decision-threshold"):
            V.parse_threshold(bad)
    assert V.SessionCoder(codec, 300, 30).enc.decision_thresholds == [DEFAULT_DECISION_THRESHOLD] * codec.levels
    assert V.SessionCoder(codec, 300, 30, decision_threshold=0).enc.decision_thresholds == [0.0] * codec.levels


def test_tables_fitted_with_the_decision_expect_more_zero_residuals(codec, frames):
    import torch

    from streamer.codec.codec import to_tensor
    from training.tables import decided_residual_tables

    with torch.inference_mode():
        y = codec.encoder(to_tensor(np.stack(frames[:8])))
    plain = residual.fit_levels(codec.quantizer, [y])
    decided = decided_residual_tables(codec, [y], 0.8)
    assert decided.shape == plain.shape and decided.sum() == plain.sum()  # the same residuals counted
    zero = lambda t: t[..., residual.OFFSET].sum(axis=(1, 2)) / t.sum(axis=(1, 2, 3))
    assert (zero(decided) > zero(plain)).all(), (zero(decided), zero(plain))
    assert np.array_equal(decided_residual_tables(codec, [y], 0.49), plain)  # under half a step: no change
