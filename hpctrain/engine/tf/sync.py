"""The TensorFlow engine's part of the synchronization strategies (hpctrain.sync): local SGD on its horovod backend.
Every rank steps on its own gradients (a second traced step that skips the gradient allreduce); the model's weights
(trainable and BatchNorm's moving statistics) are averaged every K steps through one Horovod grouped allreduce,
after W warm-up steps of the usual gradient allreduce. Before a save or an evaluation the ranks settle (weights
and the optimizer's per-element slots averaged), so every checkpoint is one model. PowerSGD and ZeRO are
PyTorch-only (hpctrain.config says so before anything starts)."""
from __future__ import annotations

from hpctrain.sync import Policy


class LocalSGD:
    def __init__(self, backend, policy: Policy):
        self.backend, self.schedule = backend, policy.schedule
        self.drifted = False

    def reduces_gradients(self, step: int) -> bool:
        return self.schedule.allreduces_gradients(step)

    def after_step(self, model, step: int) -> None:
        if not self.reduces_gradients(step):
            self.drifted = True
        if self.schedule.averages_after(step):
            with self.backend.traffic.sync():
                self.backend.average_variables(floating(model.weights))

    def settle(self, model, optimizer) -> bool:
        """Every rank the same weights and optimizer slots (not the step counter: equal already); True if it acted."""
        if not self.drifted:
            return False
        with self.backend.traffic.sync():
            self.backend.average_variables(floating([*model.weights, *optimizer.variables]))
        self.drifted = False
        return True


def floating(variables) -> list:
    return [v for v in variables if "float" in str(v.dtype) and len(v.shape) > 0]


def make_sync(backend, cfg) -> LocalSGD | None:
    policy = Policy.of(cfg)
    return LocalSGD(backend, policy) if policy.strategy == "local-sgd" else None
