"""Which samples each rank reads, in which order: framework-neutral (numpy only).

The training order of epoch e is a permutation drawn from (seed, e), padded by wrapping so every
rank gets the same number of samples (DistributedSampler's rule), then dealt rank::size. Batches
are yielded as lists of `(index, epoch)` keys so the dataset can seed each sample's augmentation
from them: the same sample gets the same crop whatever the worker count, and a run resumed in the
middle of an epoch sees exactly the batches it would have seen.

`contiguous=True` (token shards, BERT): rank r owns the sequence range [r*N//size, (r+1)*N//size),
so it reads only its own part of the memory-mapped shards; the range is reshuffled per epoch from
(seed, epoch, rank) and trimmed to the smallest range (N//size) so every rank yields the same number
of batches (a different few samples sit out each epoch).
"""
from __future__ import annotations

import math

import numpy as np


class ShardedBatchSampler:
    def __init__(self, num_samples: int, rank: int, size: int, batch_size: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True, pad: bool = True, contiguous: bool = False):
        if num_samples < 1:
            raise ValueError(f"dataset is empty (0 samples); nothing to shard over {size} rank(s)")
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside 0..{size - 1}")
        self.num_samples, self.rank, self.size = num_samples, rank, size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_last, self.pad, self.contiguous = drop_last, pad, contiguous
        if contiguous and num_samples < size:
            raise ValueError(f"{num_samples} sample(s) cannot give each of {size} ranks a contiguous range")
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; skip the first `skip_batches` batches (resume mid-epoch)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def rank_range(self, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of the samples rank `rank` (default: this rank) owns in contiguous mode."""
        r = self.rank if rank is None else rank
        return r * self.num_samples // self.size, (r + 1) * self.num_samples // self.size

    @property
    def samples_per_rank(self) -> int:
        if self.contiguous:
            return self.num_samples // self.size  # the smallest range: equal batch counts on all ranks
        if self.pad:
            return math.ceil(self.num_samples / self.size)
        return len(range(self.rank, self.num_samples, self.size))

    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def rank_indices(self, epoch: int) -> np.ndarray:
        if self.contiguous:
            start, stop = self.rank_range()
            idx = np.arange(start, stop)
            if self.shuffle:
                idx = np.random.default_rng([self.seed, epoch, self.rank, 7]).permutation(idx)
            return idx[:self.samples_per_rank]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.pad:
            total = math.ceil(self.num_samples / self.size) * self.size
            order = np.resize(order, total)  # wraps around: the first samples fill the last places
        return order[self.rank::self.size]

    def __iter__(self):
        idx = self.rank_indices(self.epoch)
        for b in range(self.skip_batches, len(self)):
            chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(int(i), self.epoch) for i in chunk]
