"""Run under mpirun -np 2. Local SGD in the TensorFlow engine (horovod backend), float64 Keras:

    K=1 with plain SGD            == allreduce SGD (the plain Horovod step)
    K=4 after 2 warm-up steps     ranks differ between averages and are identical right after each (BatchNorm's
                                  moving statistics included); bytes per step as the schedule says; a resume at
                                  step 5 (between the averages after steps 2 and 6) equals the uninterrupted run

Prints one line `OK <rank> <json>` per rank; any failed check raises.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from hpctrain.cluster import detect
from hpctrain.config import TrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.tf import BatchStream, Trainer, setup
from hpctrain.sync import Schedule
from tests.parallel.table import Table
from tests.parallel.tf_reference import flat

EXACT = 1e-12


class Exact:
    def __call__(self, model, batch, training: bool):
        x, y = batch
        logits = model(x, training=training)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        n = tf.cast(tf.shape(y)[0], tf.float64)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float64))
        return loss, tf.stack([tf.cast(loss, tf.float64) * n, correct, n])


def trainer(rt, cluster, momentum=0.0, batchnorm=False, **sync):
    cfg = TrainConfig()
    cfg.run.run_dir = tempfile.mkdtemp()
    cfg.dist.framework, cfg.dist.backend = "tf", "horovod"
    for k, v in sync.items():
        setattr(cfg.sync, k, v)
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.05, momentum, 0.0
    cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.lr_scaling = 0, "constant", "none"
    cfg.data.batch_size = 4
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 8)), rng.integers(0, 3, 96)
    keras.utils.set_random_seed(1000 + cluster.rank)  # a different init per rank: restore broadcasts rank 0's
    layers = [keras.layers.Dense(16), keras.layers.BatchNormalization()] if batchnorm else [keras.layers.Dense(16)]
    net = keras.Sequential([keras.Input((8,)), *layers, keras.layers.Activation("tanh"), keras.layers.Dense(3)])
    sampler = ShardedBatchSampler(len(x), cluster.rank, cluster.size, cfg.data.batch_size, seed=7)
    t = Trainer(net, BatchStream(Table(x, y), sampler), None, rt, cfg, Exact())
    t.restore(None)
    t.traffic.take()
    return t


def run(t, steps):
    batches = t.epoch_batches(0, t.step)
    for _ in range(steps):
        t.train_step([next(batches)])


def spread(rt, values) -> float:
    return float(np.abs(values - rt.backend.allreduce(values, "mean")).max())


def k4(rt, cluster) -> dict:
    schedule, options = Schedule(4, 2), dict(strategy="local-sgd", period=4, warmup=2, momentum=0.9, batchnorm=True)
    t = trainer(rt, cluster, **options)
    sizes = {v.path: int(np.prod(v.shape)) * 8 for v in t.model.weights}
    trainable = sum(int(np.prod(v.shape)) * 8 for v in t.model.trainable_weights)
    everything = sum(sizes.values())
    batches, state = t.epoch_batches(0, 0), None
    for step in range(12):
        t.train_step([next(batches)])
        sent = t.traffic.take()[0]
        weights = spread(rt, flat(t.model.trainable_weights))
        if schedule.averages_after(step):
            assert spread(rt, flat(t.model.weights)) == 0.0 and sent == everything, (step, sent, everything)
        elif schedule.allreduces_gradients(step):
            assert weights == 0.0 and sent == trainable, (step, weights, sent, trainable)
        else:
            assert weights > 1e-6 and sent == 0, (step, weights, sent)
        if step == 4:
            t.sync_buffers()  # what a save does first: every rank the same weights and slots
            state = t.state()
            assert spread(rt, flat(t.model.weights)) == 0.0
            t.traffic.take()
    resumed = trainer(rt, cluster, **options)
    resumed.step = resumed.restore(("memory", state) if cluster.rank == 0 else None)
    run(resumed, 7)
    d = float(np.abs(flat(t.model.weights) - flat(resumed.model.weights)).max())
    assert d < EXACT, f"local SGD resumed at step 5 differs from the uninterrupted run by {d}"
    return {"k4_resume_diff": d, "bytes_per_sync": everything, "bytes_per_warmup_step": trainable}


def main():
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    cluster = detect()
    cfg = TrainConfig()
    cfg.dist.framework = "tf"
    cfg.run.run_dir = tempfile.mkdtemp()
    rt = setup(cfg, cluster)
    plain, local = trainer(rt, cluster), trainer(rt, cluster, strategy="local-sgd", period=1)
    run(plain, 6)
    run(local, 6)
    d = float(np.abs(flat(plain.model.weights) - flat(local.model.weights)).max())
    assert d < EXACT, f"local SGD K=1 differs from allreduce SGD by {d}"
    report = {"rank": cluster.rank, "k1_vs_allreduce": d, **k4(rt, cluster)}
    sys.stdout.write(f"OK {cluster.rank} {json.dumps(report)}\n")
    sys.stdout.flush()
    rt.backend.barrier()


if __name__ == "__main__":
    main()
