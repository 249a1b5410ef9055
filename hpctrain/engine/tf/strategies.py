"""tf.distribute backends of the TensorFlow engine: `multiworker` (MultiWorkerMirroredStrategy, one process
per node or per GPU, any launcher or a TF_CONFIG set by hand) and `mirrored` (MirroredStrategy, one process
over its local devices). The same Trainer, data, checkpoints and stop path as `horovod`.

- The step runs under `strategy.run`; Keras 3's optimizer SUMS gradients over every replica inside
  `apply_gradients` (a replica-context all-reduce), so `allreduce_grads` hands it gradient / replicas.
- Each worker reads its own shard (hpctrain's sampler, not TF's auto-shard): the worker's batch is cut into
  one per-replica batch per local device by `distribute_datasets_from_function` + `rebatch`.
- Host values (metrics, the stop flag, the save verdict, rank 0's weights at resume) cross workers with
  the strategy's own reduction: `strategy.reduce(SUM)` over a value that only the worker's first replica
  carries, so sums of integers stay exact.
- TF_CONFIG comes from hpctrain.cluster.tf_config (the launcher's ranks, or the user's own TF_CONFIG).
- Checkpoints: every worker reads the state (reading a variable synchronised on read is a collective), only
  rank 0 writes it, atomically, through the same CheckpointManager; the others wait in the verdict broadcast.
  TF's rule that non-chief workers save to a scratch directory belongs to tf.train.Checkpoint/SavedModel,
  which this engine does not use, so nothing is written twice. Keras' BackupAndRestore is not wired: it is a
  `model.fit` callback (fit is broken under MultiWorkerMirroredStrategy with Keras 3) and adds nothing over
  hpctrain's checkpoint + sampler offset, which already resume mid-epoch.
"""
from __future__ import annotations

import contextlib
import pickle

import numpy as np
import tensorflow as tf

from hpctrain import netiface
from hpctrain.cluster import ClusterError, port_in_use, tf_config
from hpctrain.config import ConfigError
from hpctrain.engine.runtime import single_process_only
from hpctrain.engine.tf.backends import LocalBackend


class StrategyBackend(LocalBackend):
    """What both strategies share: the step under strategy.run, distributed input, host collectives."""
    collective_reads = True
    counts_traffic = False  # the strategy's own all-reduce inside apply_gradients: not seen here

    def __init__(self, cfg, cluster, strategy):
        super().__init__(cfg, cluster)
        self.strategy = strategy
        self.local_replicas = len(strategy.extended.worker_devices)
        self.replicas = strategy.num_replicas_in_sync

    def scope(self):
        return self.strategy.scope()

    def run_step(self, step, micro_batches):
        """Inside the tf.function: every local replica runs `step` on its share; returns this worker's
        summed statistics (the loop sums them over workers, as for one Horovod rank)."""
        per_replica = self.strategy.run(step, args=(micro_batches,))
        return tf.add_n(self.strategy.experimental_local_results(per_replica))

    def distribute(self, make_dataset, per_replica_batch: int):
        """The worker's batches (one per step, local replicas x per-replica batch) -> per-replica batches."""
        return self.strategy.distribute_datasets_from_function(
            lambda _: make_dataset().rebatch(per_replica_batch, drop_remainder=True))

    def allreduce_grads(self, grads):
        # Keras sums over replicas in apply_gradients; dividing first makes that sum the mean. IndexedSlices
        # (embeddings) are densified, as for Horovod.
        return [tf.convert_to_tensor(g) / self.replicas for g in grads]

    def local_values(self, variable) -> list[np.ndarray]:
        return [np.asarray(v) for v in self.strategy.experimental_local_results(getattr(variable, "value", variable))]

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        out = np.asarray(values, dtype=np.float64)
        if self.size > 1:
            first = iter([out])

            def value(_):  # called once per local replica: the first carries the worker's value
                return tf.constant(next(first, np.zeros_like(out)))
            per_replica = self.strategy.experimental_distribute_values_from_function(value)
            out = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
        return out / self.size if op == "mean" else out

    def broadcast_object(self, obj):
        if self.size == 1:
            return obj
        payload = np.frombuffer(pickle.dumps(obj), np.uint8) if self.rank == 0 else np.zeros(0, np.uint8)
        n = int(self.allreduce(np.array([payload.size]))[0])
        buf = np.zeros(n)
        buf[:payload.size] = payload
        return pickle.loads(self.allreduce(buf).astype(np.uint8).tobytes())

    def broadcast_variables(self, variables) -> None:
        """Rank 0's values to every worker in one reduction (the others contribute zeros). Within a worker,
        an assignment outside strategy.run writes every local copy."""
        if self.size == 1:
            return
        arrays = [np.asarray(v) for v in variables]
        flat = np.concatenate([a.astype(np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
        flat = self.allreduce(flat if self.rank == 0 else np.zeros_like(flat))
        offset = 0
        for v, a in zip(variables, arrays):
            v.assign(flat[offset:offset + a.size].reshape(a.shape).astype(a.dtype))
            offset += a.size

    def barrier(self) -> None:
        self.allreduce(np.zeros(1))


class MirroredBackend(StrategyBackend):
    name = "mirrored"

    def __init__(self, cfg, cluster, gpus: list):
        single_process_only(cluster, "tf", "mirrored")  # one process over its local devices
        if gpus:
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
            ops = tf.distribute.NcclAllReduce() if cfg.collective in ("auto", "nccl") else None
        else:
            if cfg.collective == "nccl":
                raise ConfigError("dist.collective (--collective): 'nccl' needs GPUs (allowed on CPU: auto)")
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            ops = tf.distribute.ReductionToOneDevice()  # NCCL has no CPU path
        super().__init__(cfg, cluster, tf.distribute.MirroredStrategy(devices, cross_device_ops=ops))


class MultiWorkerBackend(StrategyBackend):
    name = "multiworker"

    def __init__(self, cfg, cluster, gpus: list):
        conf = tf_config(cluster, cfg.port_base, hosts=mpi_hosts(cluster))
        rank = cluster.rank  # tf_config checked that a user's TF_CONFIG puts this task there
        host, port = (conf["cluster"].get("chief", []) + conf["cluster"]["worker"])[rank].rsplit(":", 1)
        if port_in_use(int(port)):
            raise ClusterError(f"--backend multiworker: port {port} of worker {rank} ({host}) is already in use; move "
                               f"the workers' ports with --port-base (now {cfg.port_base}; worker k uses base + k) "
                               "or change TF_CONFIG if you set it")
        impl = tf.distribute.experimental.CommunicationImplementation
        choice = {"ring": impl.RING, "nccl": impl.NCCL}.get(cfg.collective, impl.NCCL if gpus else impl.RING)
        if choice == impl.NCCL and not gpus:
            raise ConfigError("dist.collective (--collective): 'nccl' needs GPUs (allowed on CPU: auto, ring)")
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(conf["cluster"]), task_type=conf["task"]["type"], task_id=conf["task"]["index"],
            rpc_layer="grpc")
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=choice))
        super().__init__(cfg, cluster, strategy)
        self.tf_config, self.collective = conf, choice.name


def mpi_hosts(cluster) -> list[str] | None:
    """Every rank's host name, gathered over MPI when an MPI launcher started this job on several nodes (Open MPI's
    and PMIx's variables do not name the other hosts); with HPCTRAIN_NET_IFACE the address of that interface
    instead, so TF's gRPC takes it; else None (cluster.tf_config decides)."""
    if cluster.local_size == cluster.size or cluster.launcher not in ("openmpi", "pmi", "slurm"):
        return None
    with contextlib.suppress(ImportError):
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if comm.Get_size() == cluster.size:  # srun without an MPI plugin gives singletons: use Slurm's node list
            return comm.allgather(netiface.node_address())
    return None
