"""Run under a launcher. The TF engine's gradient path (sampler -> tf.data -> Trainer.train_step ->
Horovod grouped allreduce -> Keras optimizer) must give the same weights as one process doing
full-batch SGD on the union of every rank's micro-batches, identical on every rank; rank 0's weights
and optimizer slots must reach every rank at resume. Several variants in one process (TF starts slowly).

    mpirun -np 2 python tests/parallel/worker_tf_trainer.py
Prints one line `OK <rank> <json>` per rank; any mismatch raises (non-zero exit).
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
from hpctrain.engine.tf.backends import HorovodBackend
from hpctrain.models.tf.resnet import Classification, build_resnet
from tests.parallel.table import Table
from tests.parallel.tf_reference import OneDevice, flat


def variant(rt, cluster, name, accumulate=1, fp16_allreduce=False, model="mlp", steps=3, adasum=False):
    r, n = cluster.rank, cluster.size
    cfg = TrainConfig()
    cfg.run.run_dir = tempfile.mkdtemp()
    cfg.dist.backend, cfg.dist.accumulate, cfg.dist.fp16_allreduce = "horovod", accumulate, fp16_allreduce
    cfg.dist.adasum = adasum
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.1, 0.9, 0.0
    cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.lr_scaling = 0, "constant", "none"
    cfg.data.batch_size = 4
    rt.backend = HorovodBackend(cfg.dist, cluster)  # compression is the backend's: one per variant
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(1000 + r)  # different init per rank: the resume broadcast must fix it
    if model == "mlp":
        x, y = rng.normal(size=(96, 8)), rng.integers(0, 3, 96)
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    else:
        x, y = rng.normal(size=(48, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 48)
        net = build_resnet("resnet18", 10, 32)
    sampler = ShardedBatchSampler(len(x), r, n, cfg.data.batch_size, seed=7)
    trainer = Trainer(net, BatchStream(Table(x, y), sampler), None, rt, cfg, Classification())
    for v in trainer.optimizer.variables:  # per-rank optimizer state: rank 0's must win at resume
        v.assign(np.full(v.shape, float(r + 1), dtype=np.asarray(v).dtype))
    trainer.resume()  # a fresh dir: nothing to load, rank 0's weights and slots go to every rank
    slots = flat(trainer.optimizer.variables)
    assert np.all(rt.backend.allreduce(slots, "mean") == slots), f"rank {r}: optimizer state not broadcast"

    out = {"variant": name}
    ref = OneDevice(net, trainer, cfg, x, y, n, cfg.data.batch_size) if model == "mlp" else None
    batches = trainer.epoch_batches(0, 0)
    for _ in range(steps):
        trainer.train_step([next(batches) for _ in range(accumulate)])
        if ref is not None:  # one process: the union of every rank's micro-batches, mean loss, one step
            ref.step(accumulate)
    trainer.sync_buffers()  # BatchNorm statistics: equal on every rank before a save or an evaluation
    mine = flat(trainer.model.weights)
    spread = float(np.abs(mine - rt.backend.allreduce(mine, "mean")).max())
    assert spread == 0.0, f"rank {r} ({name}): weights differ across ranks by {spread}"
    out["spread"] = spread
    if model == "mlp" and not adasum:  # Adasum is not an average: only agreement across ranks is checked
        diff = float(np.abs(mine - flat(ref.model.weights)).max())
        tol = 2e-3 if fp16_allreduce else 1e-5
        assert diff < tol, f"rank {r} ({name}): differs from the single-process full-batch result by {diff}"
        out["diff_vs_single_process"] = diff
    trainer.close(collective=False)
    return out


def main():
    keras.config.set_floatx("float64")  # the MLP in float64: only the reduction order may differ
    keras.config.set_dtype_policy("float64")
    cluster = detect()
    cfg = TrainConfig()
    cfg.run.run_dir = tempfile.mkdtemp()
    rt = setup(cfg, cluster)
    results = [variant(rt, cluster, "plain"), variant(rt, cluster, "accumulate2", accumulate=2),
               variant(rt, cluster, "fp16_allreduce", fp16_allreduce=True), variant(rt, cluster, "adasum", adasum=True)]
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    results.append(variant(rt, cluster, "resnet18_batchnorm", model="resnet", steps=2))
    report = {"size": cluster.size, "launcher": cluster.launcher, "results": results}
    sys.stdout.write(f"OK {cluster.rank} {json.dumps(report)}\n")
    sys.stdout.flush()
    rt.backend.barrier()


if __name__ == "__main__":
    main()
