"""Framework-neutral sources -> tf.data: the same sharded sampler (per-rank shards, per-epoch reshuffle,
mid-epoch skip) and the same samples as the torch driver; decoding runs in tf.data's thread pool
(Pillow and numpy release the GIL for the heavy part), batches are prefetched."""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def collate(samples: list):
    """A list of samples (tuples or dicts of numpy values) -> one batch of stacked arrays."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: np.stack([np.asarray(s[k]) for s in samples]) for k in first}
    return tuple(np.stack([np.asarray(s[i]) for s in samples]) for i in range(len(first)))


class BatchStream:
    """Batches of `source` in the order `sampler` deals them to this rank, as a tf.data pipeline."""

    def __init__(self, source, sampler, parallel: int = 0, distribute=None):
        """`distribute(make_dataset)`: the backend's hook from this rank's batches to what its step takes
        (tf.distribute cuts them into per-replica batches); None: the tf.data iterator itself."""
        self.source, self.sampler, self.distribute = source, sampler, distribute
        self.parallel = parallel or tf.data.AUTOTUNE
        probe = collate([source[(0, 0)]])
        self.structure = probe
        flat = tf.nest.flatten(probe)
        self.dtypes = [tf.as_dtype(a.dtype) for a in flat]
        self.shapes = [(None, *a.shape[1:]) for a in flat]

    def _load(self, keys: list):
        def load(i):
            return tf.nest.flatten(collate([self.source[tuple(k)] for k in keys[int(i)]]))

        def to_batch(i):
            flat = tf.numpy_function(load, [i], self.dtypes, stateful=False)
            flat = [tf.ensure_shape(t, s) for t, s in zip(flat, self.shapes)]
            return tf.nest.pack_sequence_as(self.structure, flat)
        ds = tf.data.Dataset.range(len(keys)).map(to_batch, num_parallel_calls=self.parallel, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def epoch(self, epoch: int | None = None, skip_batches: int = 0):
        """An iterator over this rank's batches of `epoch` from batch `skip_batches` on (a resume)."""
        if epoch is not None:
            self.sampler.set_epoch(epoch, skip_batches=skip_batches)
        keys = [list(batch) for batch in self.sampler]
        if self.distribute is not None:
            return iter(self.distribute(lambda: self._load(keys)))
        return iter(self._load(keys))
