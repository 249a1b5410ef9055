"""Run as one process (`--backend mirrored`, 2 logical CPU devices) or as 2 workers (`--backend multiworker`
under mpirun, or under a TF_CONFIG written by hand). The tf.distribute path (sampler -> tf.data ->
distribute_datasets_from_function -> strategy.run -> Keras' replica all-reduce) must give the same weights as
one device doing full-batch SGD on the union of every replica's batches, identical on every worker; rank 0's
weights and optimizer slots must reach every worker at resume; BatchNorm statistics synced at a save.

    python tests/parallel/worker_tf_strategy.py mirrored
    mpirun -np 2 python tests/parallel/worker_tf_strategy.py multiworker
Prints one line `OK <rank> <json>` per worker; any mismatch raises (non-zero exit).
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from hpctrain.cluster import detect
from hpctrain.config import TrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.tf import BatchStream, Trainer, setup
from hpctrain.models.tf.resnet import Classification, build_resnet
from tests.parallel.table import Table
from tests.parallel.tf_reference import OneDevice, flat

BATCH = 4  # per replica



def variant(rt, cfg, name, accumulate=1, model="mlp", steps=3):
    backend, r = rt.backend, rt.cluster.rank
    workers, local = backend.size, backend.local_replicas
    cfg.dist.accumulate = accumulate
    cfg.run.run_dir = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(1000 + r)  # different init per worker: the resume broadcast must fix it
    worker_batch = BATCH * local
    with backend.scope():
        if model == "mlp":
            x, y = rng.normal(size=(96, 8)), rng.integers(0, 3, 96)
            net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                    keras.layers.Dense(3)])
        else:
            x, y = rng.normal(size=(48, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 48)
            net = build_resnet("resnet18", 10, 32)
        sampler = ShardedBatchSampler(len(x), rt.data_rank, rt.data_size, worker_batch, seed=7)
        stream = BatchStream(Table(x, y), sampler, distribute=lambda make: backend.distribute(make, BATCH))
        trainer = Trainer(net, stream, None, rt, cfg, Classification())
    for v in trainer.optimizer.variables:  # per-worker optimizer state: rank 0's must win at resume
        v.assign(np.full(v.shape, float(r + 1), dtype=np.asarray(v).dtype))
    trainer.resume()  # a fresh dir: nothing to load, rank 0's weights and slots go to every worker
    slots = flat(trainer.optimizer.variables)
    assert np.all(backend.allreduce(slots, "mean") == slots), f"rank {r}: optimizer state not broadcast"

    out = {"variant": name, "replicas": backend.replicas, "local_replicas": local}
    ref = OneDevice(net, trainer, cfg, x, y, workers, worker_batch) if model == "mlp" else None
    batches = trainer.epoch_batches(0, 0)
    for _ in range(steps):
        trainer.train_step([next(batches) for _ in range(accumulate)])
        if ref is not None:  # one device: the union of every replica's micro-batches, mean loss, one step
            ref.step(accumulate)
    if model != "mlp":  # each replica updated its own BatchNorm copy: they differ until synced
        stats = [v for v in net.non_trainable_variables if "moving_mean" in v.path]
        out["bn_local_spread_before"] = max(float(np.ptp(backend.local_values(v), axis=0).max()) for v in stats)
    trainer.sync_buffers()
    mine = flat(trainer.model.weights)
    spread = float(np.abs(mine - backend.allreduce(mine, "mean")).max())
    assert spread == 0.0, f"rank {r} ({name}): weights differ across workers by {spread}"
    if model != "mlp":
        out["bn_local_spread_after"] = max(float(np.ptp(backend.local_values(v), axis=0).max()) for v in stats)
    out["spread"] = spread
    if model == "mlp":
        diff = float(np.abs(mine - flat(ref.model.weights)).max())
        assert diff < 1e-6, f"rank {r} ({name}): differs from the single-device full-batch result by {diff}"
        out["diff_vs_single_device"] = diff
    trainer.close(collective=False)
    return out


def main():
    keras.config.set_floatx("float64")  # the MLP in float64: only the reduction order may differ
    keras.config.set_dtype_policy("float64")
    cluster = detect()
    cfg = TrainConfig()
    cfg.run.run_dir = tempfile.mkdtemp()
    cfg.dist.framework, cfg.dist.backend = "tf", sys.argv[1]
    cfg.dist.cpu_devices = 2 if sys.argv[1] == "mirrored" else 1
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.1, 0.9, 0.0
    cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.lr_scaling = 0, "constant", "none"
    cfg.data.batch_size = BATCH
    rt = setup(cfg, cluster)
    results = [variant(rt, cfg, "plain"), variant(rt, cfg, "accumulate2", accumulate=2)]
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    results.append(variant(rt, cfg, "resnet18_batchnorm", model="resnet", steps=2))
    info = {"size": cluster.size, "launcher": cluster.launcher, "backend": rt.backend.name,
            "collective": getattr(rt.backend, "collective", None), "results": results}
    sys.stdout.write(f"OK {cluster.rank} {json.dumps(info)}\n")
    sys.stdout.flush()
    rt.backend.barrier()


if __name__ == "__main__":
    main()
