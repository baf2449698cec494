"""The training order: a seeded permutation per epoch, shared by ranks without overlap, resumable mid-epoch."""

import pytest

from seer.data.resumable import EpochShuffleSampler


def _epochs(sampler, epochs):
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_each_epoch_is_a_seeded_permutation_of_full_length():
    sampler = EpochShuffleSampler(10, seed=3)
    first, second = _epochs(sampler, [0, 1])
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert _epochs(EpochShuffleSampler(10, seed=3), [1]) == [second]  # epoch e alone gives the same order


@pytest.mark.parametrize("n, world", [(10, 2), (11, 3), (8, 4)])
def test_ranks_share_each_epoch_without_overlap(n, world):
    for epoch in range(3):
        shares = [_epochs(EpochShuffleSampler(n, seed=0, rank=r, world_size=world), [epoch])[0] for r in range(world)]
        seen = [i for share in shares for i in share]
        assert len(seen) == len(set(seen)) == world * (n // world)  # the n % world left over are dropped
        assert all(len(share) == len(EpochShuffleSampler(n, 0, r, world)) == n // world
                   for r, share in enumerate(shares))


def test_resume_skips_only_the_rows_seen_in_the_resumed_epoch():
    full = _epochs(EpochShuffleSampler(8, seed=1, rank=1, world_size=2), [0, 1, 2])
    resumed = EpochShuffleSampler(8, seed=1, rank=1, world_size=2, resume_epoch=1, skip=3)
    assert len(resumed) == 4  # Lightning counts the resumed epoch's batches from where the checkpoint was
    assert _epochs(resumed, [1, 2]) == [full[1][3:], full[2]]


def test_more_ranks_than_rows_is_refused():
    with pytest.raises(ValueError, match="3 training rows cannot be shared by 4 processes"):
        EpochShuffleSampler(3, seed=0, world_size=4)
