"""The TensorFlow engine (Keras 3 models, a custom tf.function loop, Horovod, tf.distribute or one process):
`setup(cfg, cluster)` and `make_trainer(...)` for hpctrain.engine.build.

    runtime.py   setup: GPU per local rank or CPU threads, mixed precision, seeds, backend
    backends.py  horovod (one allreduce per gradient, fused by Horovod; Adasum, fp16 compression), none
    strategies.py  tf.distribute: multiworker (MultiWorkerMirroredStrategy), mirrored (MirroredStrategy)
    data.py      the neutral sources and sharded sampler as a tf.data pipeline
    trainer.py   Trainer: the loop's engine protocol; .npz checkpoints through CheckpointManager
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF C++ INFO/WARNING logs (TF 2.21's absl start-up lines ignore it)

from hpctrain.engine.runtime import Runtime
from hpctrain.engine.tf.data import BatchStream
from hpctrain.engine.tf.runtime import setup
from hpctrain.engine.tf.trainer import Trainer
from hpctrain.engine.trainer import Job

__all__ = ["BatchStream", "Trainer", "make_trainer", "setup"]


def make_trainer(recipe, cfg, rt: Runtime, data, train_sampler, val_sampler, job: Job) -> Trainer:
    """The samplers as tf.data streams (a tf.distribute backend cuts them per replica), the recipe's Keras model
    and task built in the backend's scope, the Trainer."""
    workers, backend = cfg.data.workers, rt.backend
    train = BatchStream(data.train, train_sampler, workers,
                        distribute=lambda make: backend.distribute(make, cfg.data.batch_size))
    val = BatchStream(data.val, val_sampler, workers) if val_sampler is not None else None
    with backend.scope():  # tf.distribute: model and optimizer variables mirrored on every replica
        model = recipe.tf_model(cfg, data)
        return Trainer(model, train, val, rt, cfg, recipe.tf_task(cfg), job=job)
