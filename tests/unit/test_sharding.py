import pytest

from hpctrain.data.sharding import ShardedBatchSampler


@pytest.mark.parametrize("n, size", [(10, 1), (10, 2), (10, 3), (7, 4)])
def test_every_sample_once_per_epoch_padded_equally(n, size):
    samplers = [ShardedBatchSampler(n, r, size, batch_size=1, seed=0, drop_last=False) for r in range(size)]
    per_rank = [[k for b in s for k in b] for s in samplers]
    assert len({len(p) for p in per_rank}) == 1  # equal work on every rank
    seen = [i for p in per_rank for i, _ in p]
    assert set(seen) == set(range(n)) and len(seen) - n < size  # at most size-1 padded repeats


def test_reshuffle_per_epoch_and_determinism():
    s = ShardedBatchSampler(100, 0, 2, 10, seed=3)
    s.set_epoch(0)
    a = [k for b in s for k in b]
    s.set_epoch(1)
    b = [k for b in s for k in b]
    assert [i for i, _ in a] != [i for i, _ in b] and {e for _, e in b} == {1}
    s.set_epoch(0)
    assert [k for b in s for k in b] == a


def test_resume_mid_epoch_skips_consumed_batches():
    s = ShardedBatchSampler(64, 1, 2, 4, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, skip_batches=3)
    assert list(s) == full[3:]


def test_eval_sharding_without_padding():
    n, size = 11, 3
    parts = [[i for b in ShardedBatchSampler(n, r, size, 4, 0, shuffle=False, drop_last=False, pad=False) for i, _ in b]
             for r in range(size)]
    assert sorted(i for p in parts for i in p) == list(range(n))


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        ShardedBatchSampler(0, 0, 1, 4, 0)
