"""Backends of the TensorFlow engine: how gradients are combined and how ranks talk.

    scope(), run_step(step, micro_batches)   where variables live and how the tf.function step runs
    distribute(make_dataset, batch)    this rank's tf.data batches -> what the step takes
    allreduce_grads(grads) -> grads     inside the tf.function step: average over ranks
    broadcast_variables(variables)     rank 0's values to every rank
    allreduce(values, op)              numpy in, numpy out (metrics, the stop flag, BN statistics)
    broadcast_object(obj), barrier(), shutdown()
    traffic, count_step(), average_variables(variables)   what the step hands to the gradient allreduce, counted
                                       (hpctrain.metrics.Traffic; None where not counted: tf.distribute); local
                                       SGD's model average (hpctrain/engine/tf/sync.py): one grouped allreduce

Horovod 0.28.1 and Keras 3: `hvd.DistributedGradientTape` keys gradients by `var.ref()`, which Keras 3
variables lack (horovod #4290). Measured with benchmarks/tf_allreduce.py (TF ResNet-18, 2 ranks, 2 cores,
samples/s in total; no communication at all: 627): one `hvd.allreduce` per gradient 448-463, the tape
with the wrapped tf.Variables (`v.value`) as sources 456, one `hvd.grouped_allreduce` 424. We use one
allreduce per gradient: as fast as the tape (each reduction is enqueued as soon as its gradient exists,
Horovod fuses them in the background, so communication overlaps the rest of the backward pass), and it
touches no Keras variable internals. With gradient accumulation the summed gradients are reduced once.
"""
from __future__ import annotations

import contextlib

import numpy as np

from hpctrain import quiet
from hpctrain.engine.horovod import ObjectBroadcast, start_horovod
from hpctrain.metrics import Traffic


class LocalBackend:
    name = "none"
    collective_reads = False  # does reading a variable's value need every worker (tf.distribute)?

    def __init__(self, cfg, cluster):
        self.cfg, self.cluster = cfg, cluster
        self.rank, self.size = cluster.rank, cluster.size
        self.data_rank, self.data_size = cluster.rank, cluster.size
        self.local_replicas, self.replicas = 1, cluster.size  # tf.distribute: devices per process, in sync
        self.traffic = Traffic() if self.counts_traffic else None
        self.step_bytes = 0  # what one step's gradient allreduce hands over (set when the step is traced)

    counts_traffic = True  # one process sends nothing; Horovod counts; tf.distribute's reductions are not counted

    def count_step(self) -> None:
        """A step reduced its gradients: count what the traced step hands to the allreduce."""
        if self.traffic is not None:
            self.traffic.add(self.step_bytes)

    def average_variables(self, variables) -> None:
        pass  # one process: its variables are the mean

    def scope(self):
        return contextlib.nullcontext()

    def run_step(self, step, micro_batches):
        return step(micro_batches)

    def distribute(self, make_dataset, per_replica_batch: int):
        return make_dataset()

    def local_values(self, variable) -> list[np.ndarray]:
        return [np.asarray(variable)]

    def allreduce_grads(self, grads):
        return grads

    def broadcast_variables(self, variables) -> None:
        pass

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class HorovodBackend(LocalBackend):
    name = "horovod"

    def __init__(self, cfg, cluster):
        super().__init__(cfg, cluster)
        with quiet.captured():  # loads TF's CUDA stubs again, with their start-up lines
            import horovod.tensorflow as hvd
        self.hvd = hvd
        start_horovod(hvd, cfg, cluster, on_gpu=cluster_has_gpu())
        self.broadcast_object = ObjectBroadcast(hvd)
        self.op = hvd.Adasum if cfg.adasum else hvd.Average
        self.compression = hvd.Compression.fp16 if cfg.fp16_allreduce else hvd.Compression.none

    def allreduce_grads(self, grads):
        # Embedding gradients come as IndexedSlices; densify them (Horovod's sparse_as_dense): an allgather
        # of slices costs more than the small dense tables here, and the result is an ordinary tensor.
        import tensorflow as tf
        dense = [tf.convert_to_tensor(g) for g in grads]
        # Runs when the step is traced: shapes are static there; count_step() adds this per step.
        self.step_bytes = sum(int(np.prod(g.shape)) * (2 if self.cfg.fp16_allreduce else g.dtype.size) for g in dense)
        return [self.hvd.allreduce(g, op=self.op, compression=self.compression, name=f"hpctrain.grad.{i}")
                for i, g in enumerate(dense)]

    def average_variables(self, variables) -> None:
        """The mean over ranks of every variable, in place: one grouped allreduce (Horovod fuses it)."""
        values = [v.value if hasattr(v, "value") else v for v in variables]
        self.traffic.add(sum(int(np.prod(v.shape)) * v.dtype.size for v in values))
        averaged = self.hvd.grouped_allreduce(values, op=self.hvd.Average, name="hpctrain.sync.average")
        for v, a in zip(variables, averaged):
            v.assign(a)

    def broadcast_variables(self, variables) -> None:
        # Keras 3 variables wrap a tf.Variable (`.value`); Horovod assigns to what it is given.
        self.hvd.broadcast_variables([getattr(v, "value", v) for v in variables], root_rank=0)

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        out = self.hvd.allreduce(np.asarray(values, dtype=np.float64), op=self.hvd.Sum).numpy()
        return out / self.size if op == "mean" else out

    def barrier(self) -> None:
        # horovod.tensorflow has no barrier(); a scalar allreduce returns only when every rank is in it.
        self.hvd.allreduce(np.zeros(1), op=self.hvd.Sum, name="hpctrain.barrier")

    def shutdown(self) -> None:
        self.hvd.shutdown()


def cluster_has_gpu() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))
