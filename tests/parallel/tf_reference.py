"""The one-device reference the TF multi-rank workers compare against: a copy of the trained model and its
optimizer state, stepped by plain full-batch SGD on the union of every replica's micro-batches."""
import keras
import numpy as np
import tensorflow as tf

from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.tf.trainer import build_optimizer
from hpctrain.models.tf.resnet import Classification


def flat(variables) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in variables])


class OneDevice:
    def __init__(self, net, trainer, cfg, x, y, shards: int, batch: int):
        """`net`/`trainer` after resume (weights and slots already broadcast); `shards` samplers of `batch`
        stand for the ranks (or workers) whose batches together make one reference step."""
        self.x, self.y = x, y
        self.model = keras.models.clone_model(net)  # outside any strategy scope: one device
        self.model.set_weights(net.get_weights())
        self.opt = build_optimizer(self.model, cfg.optim)
        self.opt.build(self.model.trainable_variables)
        for v, w in zip(self.opt.variables, trainer.optimizer.variables):  # the broadcast momentum buffers
            v.assign(np.asarray(w))
        self.opt.learning_rate.assign(cfg.optim.lr)  # the trainer sets its own each step
        self.task = Classification()
        self.batches = [iter(ShardedBatchSampler(len(x), q, shards, batch, seed=7)) for q in range(shards)]

    def step(self, accumulate: int) -> None:
        idx = [i for it in self.batches for _ in range(accumulate) for i, _ in next(it)]
        with tf.GradientTape() as tape:
            loss, _ = self.task(self.model, (tf.constant(self.x[idx]), tf.constant(self.y[idx])), training=True)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.opt.apply_gradients(zip(grads, self.model.trainable_variables))
