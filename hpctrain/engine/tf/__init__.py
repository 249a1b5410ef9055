"""The TensorFlow engine (Keras 3 models, a custom tf.function loop, Horovod or one process):
`build_trainer(recipe, cfg, cluster)` -> a resumed Trainer for hpctrain.loop.

    runtime.py   setup: GPU per local rank or CPU threads, mixed precision, seeds, backend, run-dir lock
    backends.py  horovod (one allreduce per gradient, fused by Horovod; Adasum, fp16 compression), none
    strategies.py  tf.distribute: multiworker (MultiWorkerMirroredStrategy), mirrored (MirroredStrategy)
    data.py      the neutral sources and sharded sampler as a tf.data pipeline
    trainer.py   Trainer: the loop's engine protocol; .npz checkpoints through CheckpointManager
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF C++ INFO/WARNING logs (TF 2.21's absl start-up lines ignore it)

from hpctrain.engine.base import announce, open_data, open_run_dir
from hpctrain.engine.tf.data import BatchStream
from hpctrain.engine.tf.runtime import setup
from hpctrain.engine.tf.trainer import Trainer

__all__ = ["BatchStream", "Trainer", "build_trainer", "setup"]


def build_trainer(recipe, cfg, cluster) -> Trainer:
    """setup -> the recipe's data -> sharded samplers as tf.data -> its Keras model and task -> Trainer
    -> resume: the torch engine's sequence."""
    rt = setup(cfg, cluster)
    open_run_dir(recipe, cfg, rt)
    data, train_sampler, val_sampler = open_data(recipe, cfg, rt)
    workers, backend = cfg.data.workers, rt.backend
    train = BatchStream(data.train, train_sampler, workers,
                        distribute=lambda make: backend.distribute(make, cfg.data.batch_size))
    val = BatchStream(data.val, val_sampler, workers) if val_sampler is not None else None
    with backend.scope():  # tf.distribute: model and optimizer variables mirrored on every replica
        model = recipe.tf_model(cfg, data)
        trainer = Trainer(model, train, val, rt, cfg, recipe.tf_task(cfg))
    trainer.data = data
    trainer.after_train = getattr(recipe, "tf_after", None)
    trainer.identity = recipe.identity(cfg, data)
    announce(trainer, recipe, cfg, data, model.count_params())
    trainer.resume()
    return trainer
