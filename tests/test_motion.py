"""Block motion of the learned P-frames (streamer/codec/motion.py): exact integer moves that
both ends make alike, a search that finds a known move, shifts that travel and are checked."""

import numpy as np
import pytest
import torch

from streamer.codec import motion
from streamer.codec.conditional import gaussian_coder
from streamer.errors import PacketError


def integer_ref(seed: int, c: int = 6) -> torch.Tensor:
    return torch.randint(-3000, 3000, (1, c, 28, 28), generator=torch.Generator().manual_seed(seed)).float()


def test_an_exact_shift_moves_integers_by_quarter_cells_and_stays_integers():
    ref = integer_ref(0)
    assert torch.equal(motion.shift_exact(ref, 0, 0), ref)
    assert torch.equal(motion.shift_exact(ref, 4, 0)[..., 1:, :], ref[..., :-1, :])  # a cell down
    assert torch.equal(motion.shift_exact(ref, 0, -8)[..., :, :-2], ref[..., :, 2:])  # two cells left
    half = motion.shift_exact(ref, 2, 0)  # half a cell down: a row and the one above, rounded half up
    assert torch.equal(half[..., 1:, :], torch.floor((8 * ref[..., 1:, :] + 8 * ref[..., :-1, :] + 8) / 16))
    quarter = motion.shift_exact(ref, 0, 1)  # a quarter right: 3/4 of a column, 1/4 of its left one
    assert torch.equal(quarter[..., :, 1:], torch.floor((12 * ref[..., :, 1:] + 4 * ref[..., :, :-1] + 8) / 16))


def test_both_ends_move_the_reference_to_the_same_integers_with_any_thread_count():
    ref = integer_ref(1, 24)
    shifts = np.random.default_rng(0).integers(-4, 5, (7, 7, 2))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = motion.apply_shifts(ref, shifts)
        torch.set_num_threads(2)
        two = motion.apply_shifts(ref, shifts)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two) and torch.equal(one, one.round())
    # each block is its own shift of the whole reference
    for by, bx in [(0, 0), (3, 5), (6, 6)]:
        qy, qx = shifts[by, bx]
        want = motion.shift_exact(ref, int(qy), int(qx))[..., 4 * by:4 * by + 4, 4 * bx:4 * bx + 4]
        assert torch.equal(one[..., 4 * by:4 * by + 4, 4 * bx:4 * bx + 4], want)


def test_the_search_finds_the_move_that_was_made_and_keeps_a_still_picture_still():
    ref = integer_ref(2, 24)
    moved = motion.shift_exact(ref, 1, -3)
    found = motion.choose_shifts(ref, moved + torch.randn(moved.shape, generator=torch.Generator().manual_seed(0)))
    # (blocks on the replicated edge the move leaves may pick another shift equally good)
    assert (found[1:-1, 1:-1] == [1, -3]).all()
    assert (motion.choose_shifts(ref, ref) == 0).all()


def test_shifts_travel_in_the_range_stream_and_bad_ones_are_refused():
    coder = gaussian_coder()
    shifts = np.random.default_rng(1).integers(-4, 5, (7, 7, 2))
    enc = coder.encoder()
    motion.encode_shifts(coder, enc, shifts)
    payload = coder.payload(enc)
    assert np.array_equal(motion.decode_shifts(coder, coder.decoder(payload), (1, 24, 28, 28)), shifts)
    enc = coder.encoder()
    coder.encode_into(enc, np.full(98, 6), np.full(98, motion.SHIFT_SCALE_INDEX))  # beyond ±4: crafted
    with pytest.raises(PacketError, match="block shift"):
        motion.decode_shifts(coder, coder.decoder(coder.payload(enc)), (1, 24, 28, 28))


def test_the_payload_format_is_part_of_the_coder_id(monkeypatch):
    """A receiver that reads the range stream without the shifts (another release) must refuse
    these packets by their header, not misread them: the layout is in the id they carry."""
    from streamer.codec import conditional
    from streamer.codec.conditional import ConditionalCoder, coder_id

    model = ConditionalCoder([0.05, 0.1])
    now = coder_id(model, 0x1234)
    monkeypatch.setattr(conditional, "PAYLOAD_FORMAT", "plain")
    assert coder_id(model, 0x1234) != now


def test_a_latent_grid_that_is_not_whole_blocks_gets_smaller_edge_blocks():
    """--size 200 gives 25 x 25 latents: 7 x 7 blocks, the last row and column 1 cell deep."""
    ref = torch.randint(-3000, 3000, (1, 6, 25, 25), generator=torch.Generator().manual_seed(3)).float()
    assert motion.blocks_of(ref.shape) == (7, 7)
    moved = motion.shift_exact(ref, -2, 3)
    shifts = motion.choose_shifts(ref, moved)
    assert shifts.shape == (7, 7, 2) and (shifts[1:-2, 1:-2] == [-2, 3]).all()
    assert torch.equal(motion.apply_shifts(ref, shifts)[..., 4:20, 4:20], moved[..., 4:20, 4:20])
    coder = gaussian_coder()
    enc = coder.encoder()
    motion.encode_shifts(coder, enc, shifts)
    assert np.array_equal(motion.decode_shifts(coder, coder.decoder(coder.payload(enc)), ref.shape), shifts)
