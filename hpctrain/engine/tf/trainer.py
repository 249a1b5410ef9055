"""The TensorFlow engine's Trainer: hpctrain.loop's protocol over a Keras 3 model, a custom loop.

One `tf.function` step (jit_compile off unless asked): forward/backward per micro-batch with a plain
GradientTape, gradients summed over the micro-batches, combined by the backend once (one Horovod
allreduce per gradient, see backends.py), applied by the Keras optimizer. Keras' `fit` is not used: with Keras 3 it is
broken under Horovod's Keras wrappers and tf.distribute (see the TF facts note), and one custom loop
serves every backend."""
from __future__ import annotations

import functools
import io
import json

import keras
import numpy as np
import tensorflow as tf

from hpctrain import watchdog
from hpctrain.checkpoint import tensor_mismatch
from hpctrain.engine.tf.sync import make_sync
from hpctrain.engine.trainer import Job, TrainerBase


def build_optimizer(model, cfg):
    """SGD (momentum) or AdamW; no weight decay on biases and normalisation parameters, as in torch.
    Keras applies weight decay decoupled (w -= lr x wd x w) for both."""
    if cfg.optimizer == "sgd":  # config.py allows sgd and adamw only
        opt = keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay or None)
    else:
        opt = keras.optimizers.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.weight_decay:
        opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    return opt


class Trainer(TrainerBase):
    checkpoint_suffix = ".npz"

    def __init__(self, model, train_stream, val_stream, runtime, cfg, task, job: Job | None = None):
        super().__init__(runtime, cfg, train_stream.sampler, cfg.dist.accumulate, True, val_stream is not None, job)
        self.model, self.task = model, task
        self.train_stream, self.val_stream = train_stream, val_stream
        self.optimizer = build_optimizer(model, cfg.optim)
        if cfg.dist.amp == "fp16":  # fp16 gradients underflow without loss scaling; bf16 needs none
            self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
        self.optimizer.build(model.trainable_variables)  # slots now, so resume and broadcast cover them
        self._step_fn = tf.function(lambda micro_batches: self.backend.run_step(self._step, micro_batches),
                                    jit_compile=cfg.dist.jit_compile, reduce_retracing=True)
        self.sync = make_sync(self.backend, cfg)  # local SGD (horovod), or None: every gradient every step
        if self.sync is not None:  # local steps: the same step, traced without the gradient allreduce
            local = functools.partial(self._step, reduce=False)
            self._local_fn = tf.function(lambda micro_batches: self.backend.run_step(local, micro_batches),
                                         jit_compile=cfg.dist.jit_compile, reduce_retracing=True)
        self.traffic = self.backend.traffic
        self._eval_fn = tf.function(self._eval, jit_compile=cfg.dist.jit_compile, reduce_retracing=True)

    # ---- the step ----------------------------------------------------------------------------------
    def _step(self, micro_batches, reduce: bool = True):
        variables = self.model.trainable_variables
        n = len(micro_batches)
        total, stats = None, tf.zeros(3, tf.float64)
        for batch in micro_batches:  # unrolled in the graph: gradients summed locally, reduced once
            with tf.GradientTape() as tape:
                loss, batch_stats = self.task(self.model, batch, training=True)
                scaled = loss / n  # mean over the whole accumulated batch
                if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                    scaled = self.optimizer.scale_loss(scaled)
            grads = tape.gradient(scaled, variables)
            total = grads if total is None else [None if a is None else a + b for a, b in zip(total, grads)]
            stats += batch_stats
        # Variables the loss does not reach (BERT's unused pooler) have no gradient, the same on every rank.
        pairs = [(g, v) for g, v in zip(total, variables) if g is not None]
        grads = [g for g, _ in pairs]
        reduced = self.backend.allreduce_grads(grads) if reduce else grads
        self.optimizer.apply_gradients(zip(reduced, [v for _, v in pairs]))
        return stats

    def _eval(self, batch):
        return self.task(self.model, batch, training=False)[1]

    # ---- the loop's engine protocol ------------------------------------------------------------------
    def epoch_batches(self, epoch: int, skip_batches: int):
        return self.train_stream.epoch(epoch, skip_batches)

    def train_step(self, micro_batches):
        self.optimizer.learning_rate.assign(self.lr(self.step))
        if self.sync is None or self.sync.reduces_gradients(self.step):
            stats = self._step_fn(tuple(micro_batches))
            self.backend.count_step()
        else:
            stats = self._local_fn(tuple(micro_batches))
        if self.sync is not None:
            self.sync.after_step(self.model, self.step)
        self.step += 1
        return stats

    def reduce_sum(self, stats, extra: list[float]) -> list[float]:
        return self.backend.allreduce(np.concatenate([np.asarray(stats, np.float64), extra]), "sum").tolist()

    def agree(self, flag: bool) -> float:
        return float(self.backend.allreduce(np.array([float(flag)]), "sum")[0])

    def evaluate(self) -> dict:
        """Top-1 over the whole validation set: each rank scores its shard, counts are summed."""
        self.sync_buffers()
        stats = np.zeros(3)
        for batch in self.val_stream.epoch():
            stats += self._eval_fn(batch).numpy()
            watchdog.beat()
        return self.finish_evaluation(stats)

    def sync_buffers(self) -> None:
        """Average BatchNorm moving statistics (over ranks, and over a rank's tf.distribute replicas, which
        each update their own copy) so every replica evaluates and saves the same model."""
        if self.backend.size == 1 and self.backend.local_replicas == 1:
            return
        if self.sync is not None and self.sync.settle(self.model, self.optimizer):
            return  # local SGD: weights, moving statistics and optimizer slots averaged
        for v in self.model.non_trainable_variables:
            if "float" in str(v.dtype):
                local = np.mean(self.backend.local_values(v), axis=0)
                v.assign(self.backend.allreduce(local, "mean").astype(local.dtype))

    def whole_model(self):
        return self.model

    # ---- state ---------------------------------------------------------------------------------------
    def state(self) -> dict | None:
        """Rank 0's state to write. Under tf.distribute every worker reads it too (reading a variable
        synchronised on read is a collective there), and only rank 0 keeps it: nothing else is written."""
        if self.cluster.rank != 0 and not self.backend.collective_reads:
            return None
        state = {"model": [np.asarray(v) for v in self.model.weights],
                 "optimizer": [np.asarray(v) for v in self.optimizer.variables], **self.checkpoint_meta()}
        return state if self.cluster.rank == 0 else None

    @staticmethod
    def write_state(state: dict, f) -> None:
        arrays = {f"model/{i}": a for i, a in enumerate(state["model"])}
        arrays.update({f"optimizer/{i}": a for i, a in enumerate(state["optimizer"])})
        meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        buf = io.BytesIO()  # np.savez needs a seekable file; the manager's temp file is written once
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        f.write(buf.getbuffer())

    @staticmethod
    def read_state(path) -> dict:
        with np.load(path, allow_pickle=False) as z:
            def series(prefix):
                keys = sorted((k for k in z.files if k.startswith(prefix + "/")), key=lambda k: int(k.split("/")[1]))
                return [z[k] for k in keys]
            return {**json.loads(str(z["meta"])), "model": series("model"), "optimizer": series("optimizer")}

    @staticmethod
    def nonfinite(state: dict) -> str | None:
        bad = [i for i, a in enumerate(state["model"]) if a.dtype.kind == "f" and not np.isfinite(a).all()]
        return f"{len(bad)} weight(s), e.g. model weight #{bad[0]}" if bad else None

    def load_state(self, state: dict) -> None:
        self.model.set_weights(state["model"])
        if len(state["optimizer"]) == len(self.optimizer.variables):
            for v, a in zip(self.optimizer.variables, state["optimizer"]):
                v.assign(a)
        else:
            self.log("note: the checkpoint's optimizer state does not fit this optimizer: it starts fresh")

    def broadcast_state(self) -> None:
        self.backend.broadcast_variables([*self.model.weights, *self.optimizer.variables])

    def parameter_count(self) -> int:
        return self.model.count_params()

    def shape_mismatch(self, state: dict) -> str | None:
        theirs, ours = state.get("model") or [], self.model.weights
        if len(theirs) != len(ours):
            return f"{len(theirs)} weights there, {len(ours)} here"
        return tensor_mismatch({f"weight #{i} ({w.path})": a.shape for i, (a, w) in enumerate(zip(theirs, ours))},
                               {f"weight #{i} ({w.path})": tuple(w.shape) for i, w in enumerate(ours)})
