"""Learned P-frames through the call's session and assembler (offline): one conditional packet a
frame, the receiver's integer reference in lock-step with the sender's (the CRC the sender sends
beside each frame), and recovery by I-frame after a lost frame or a mismatch."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.codec import NeuralCodec
from streamer.codec.bitstream import SCTP_CHUNK_BYTES, unpack
from streamer.codec.conditional import shipped_for
from streamer.session import DecoderSession, EncoderSession, FrameType


@pytest.fixture(scope="module")
def codec():
    return NeuralCodec.load()


@pytest.fixture(scope="module")
def frames():
    from streamer.sources import prepare
    from streamer.video import SAMPLE_CLIP, read_frames

    return [prepare(f, 224) for f in read_frames(SAMPLE_CLIP, 10)]


@pytest.fixture(scope="module")
def learned(codec):
    coder = shipped_for(codec.model_id)
    assert coder is not None  # the package ships one for its default model
    return coder


def sessions(codec, learned):
    return (EncoderSession(codec, max_packet_bytes=SCTP_CHUNK_BYTES, level=3, learned=learned),
            DecoderSession(codec, learned=learned))


def send(enc: EncoderSession, frame: np.ndarray, n: int):
    cand = enc.encode(frame, n, 1_000_000 + n)
    enc.commit(cand)
    return cand


def test_learned_p_frames_are_one_packet_each_and_the_receiver_holds_the_senders_reference(codec, learned, frames):
    enc, dec = sessions(codec, learned)
    for n, frame in enumerate(frames):
        cand = send(enc, frame, n)
        picture = dec.decode(cand.packets)
        f = dec.last
        assert f.frame_number == n and f.complete and f.reference_ok
        assert f.crc() == cand.crc  # what the call's receiver checks against the sender's meta
        if n == 0:
            assert cand.frame_type == FrameType.INTRA and f.learned_ref is None
        else:
            assert cand.frame_type == FrameType.INTER and len(cand.packets) == 1
            assert unpack(cand.packets[0]).header.conditional
            assert np.array_equal(f.learned_ref.numpy(), cand.learned_ref.numpy())
            # the picture of that reference (the float intra decoder's last bit can depend on where
            # its input lies in memory: within one level; the reference itself is exact)
            expected = codec.decode_latents(cand.learned_ref / 256.0).astype(int)
            assert np.abs(picture.astype(int) - expected).max() <= 1
    assert dec.assembler.n.learned == len(frames) - 1 and dec.assembler.n.learned_undecodable == 0


def test_a_lost_learned_frame_is_concealed_until_the_i_frame_it_asks_for(codec, learned, frames):
    enc, dec = sessions(codec, learned)
    for n in range(3):
        dec.decode(send(enc, frames[n], n).packets)
    shown = dec.decode([])  # (nothing new: the last picture)
    send(enc, frames[3], 3)  # lost on the way
    picture = dec.decode(send(enc, frames[4], 4).packets)
    assert dec.last.frame_number == 4 and not dec.last.reference_ok and dec.needs_keyframe
    assert np.array_equal(picture, shown)  # concealed: the last good picture, nothing decoded on a wrong reference
    assert dec.assembler.n.learned_undecodable == 1
    assert enc.request_keyframe(dec.assembler.broken_at)
    cand = send(enc, frames[5], 5)
    assert cand.frame_type == FrameType.INTRA
    dec.decode(cand.packets)
    cand = send(enc, frames[6], 6)
    dec.decode(cand.packets)
    assert cand.frame_type == FrameType.INTER and dec.last.reference_ok and dec.last.crc() == cand.crc


def test_a_mismatched_reference_is_caught_by_the_packets_crc_never_shown_and_healed_by_an_i_frame(
        codec, learned, frames):
    enc, dec = sessions(codec, learned)
    for n in range(3):
        dec.decode(send(enc, frames[n], n).packets)
    shown = dec.decode([])
    dec.last.learned_ref[0, 5, 10, 10] += 1  # an injected mismatch: our reference is not the sender's
    picture = dec.decode(send(enc, frames[3], 3).packets)
    assert dec.assembler.n.learned_mismatched == 1 and "CRC" in dec.assembler.n.last_error
    assert np.array_equal(picture, shown) and dec.last.concealed and dec.needs_keyframe
    assert enc.request_keyframe(dec.assembler.broken_at)
    cand = send(enc, frames[4], 4)
    assert cand.frame_type == FrameType.INTRA
    dec.decode(cand.packets)
    for n in (5, 6):
        cand = send(enc, frames[n], n)
        dec.decode(cand.packets)
        assert dec.last.reference_ok and dec.last.crc() == cand.crc
    assert dec.assembler.n.learned_mismatched == 1


def test_a_scene_cut_goes_as_an_i_frame(codec, learned, frames):
    from streamer.sources import SyntheticSource

    enc, dec = sessions(codec, learned)
    for n in range(2):
        dec.decode(send(enc, frames[n], n).packets)
    cand = send(enc, SyntheticSource(224).render(3), 2)
    assert cand.frame_type == FrameType.INTRA  # cheaper than a P-frame against a face
    dec.decode(cand.packets)
    assert dec.last.reference_ok and dec.last.crc() == cand.crc


def test_a_receiver_without_the_learned_coder_refuses_learned_frames_as_foreign(codec, learned, frames):
    enc = EncoderSession(codec, level=3, learned=learned)
    dec = DecoderSession(codec)  # no learned coder
    dec.decode(send(enc, frames[0], 0).packets)
    dec.decode(send(enc, frames[1], 1).packets)
    assert dec.assembler.n.foreign == 1 and "learned" in dec.assembler.n.last_error


def test_a_receiver_with_another_learned_coder_refuses_its_frames_by_their_header(codec, learned, frames):
    import copy

    import torch

    from streamer.codec.conditional import coder_id

    other = copy.deepcopy(learned)
    with torch.no_grad():
        other.decoder[0].conv.weight[0, 0, 0, 0] += 0.5  # another release's weights
    assert coder_id(other, codec.model_id) != coder_id(learned, codec.model_id)
    assert coder_id(learned, codec.model_id) == coder_id(copy.deepcopy(learned), codec.model_id)
    assert coder_id(learned, codec.model_id) != codec.model_id
    enc = EncoderSession(codec, level=3, learned=learned)
    dec = DecoderSession(codec, learned=other)
    dec.decode(send(enc, frames[0], 0).packets)  # the I-frame is the intra model's: it decodes
    assert dec.last.frame_number == 0 and dec.last.complete
    dec.decode(send(enc, frames[1], 1).packets)
    n = dec.assembler.n
    assert n.foreign == 1 and n.learned == 0 and n.learned_mismatched == 0  # refused before any decoding
    assert f"{coder_id(learned, codec.model_id):08x}" in n.last_error
    assert f"{coder_id(other, codec.model_id):08x}" in n.last_error
