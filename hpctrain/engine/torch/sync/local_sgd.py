"""Local SGD / post-local SGD (Lin et al., ICLR 2020): every rank steps on its own gradients; the model is averaged
every K steps, after W warm-up steps of plain gradient allreduce (hpctrain.sync.Schedule).

    horovod, mpi   `LocalSGD`: no hook in the backward pass; warm-up gradients and, every K steps, parameters and
                   floating buffers averaged with ONE fused allreduce through the backend's own collective
    ddp            `PostLocalSGD`: torch's own post_localSGD_hook (PostLocalSGDState) and PeriodicModelAverager

Ranks hold different models (and optimizer states) between averages. Before a save or an evaluation `settle`
averages parameters, buffers and the optimizer state, and gives every rank rank 0's loss scale: every checkpoint
is one model, evaluated as such, and a resumed run continues exactly as an uninterrupted one (which settles at the
same steps)."""
from __future__ import annotations

import contextlib

import torch.distributed.algorithms.model_averaging.utils as averaging
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from hpctrain.engine.torch.backends.base import nbytes, plain_step
from hpctrain.engine.torch.sync.base import Sync, gradients, model_tensors, optimizer_tensors, same_loss_scale


class LocalSGD(Sync):
    name = "local-sgd"

    def __init__(self, backend, policy):
        super().__init__(backend, policy)
        self.schedule = policy.schedule
        self.drifted = False  # a local step since the last settle: weights or optimizer state differ across ranks

    def wrap(self, model, optimizer):
        return model, optimizer  # nothing hooks the backward pass: gradients stay local unless step() sends them

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()

    def step(self, model, optimizer, scaler, step: int) -> None:
        if self.schedule.allreduces_gradients(step):
            self.backend.average_(gradients(optimizer))  # warm-up: gradient averaging, one fused call
        else:
            self.drifted = True
        plain_step(optimizer, scaler)
        if self.schedule.averages_after(step):
            with self.traffic.sync():
                self.backend.average_(model_tensors(model))  # the model average: one fused call

    def settle(self, model, optimizer, scaler) -> bool:
        if not self.drifted:
            return False
        with self.traffic.sync():
            self.backend.average_([*model_tensors(self.backend.unwrap(model)), *optimizer_tensors(optimizer)])
        same_loss_scale(self.backend, scaler)
        self.drifted = False
        return True


class PostLocalSGD(LocalSGD):
    """On ddp, torch's own parts: the post-local SGD hook allreduces gradients during the warm-up and nothing after it
    (post_local_gradient_allreduce=False: each rank is its own group, as on horovod and mpi, so torch's intra-node
    default subgroup, which needs CUDA's device count, is never built); PeriodicModelAverager averages the
    parameters every K steps; the floating buffers follow in the same step (forward_sync_buffers=False: no buffer
    leaves rank 0 at every forward)."""

    def wrap(self, model, optimizer):
        model = self.backend.ddp(model, forward_sync_buffers=False)
        self.hook_state = PostLocalSGDState(process_group=None, subgroup=None,
                                            start_localSGD_iter=self.schedule.warmup,
                                            post_local_gradient_allreduce=False)
        model.register_comm_hook(self.hook_state, self.hook)
        self.averager = PeriodicModelAverager(period=self.schedule.period, warmup_steps=self.schedule.warmup)
        return model, optimizer

    def hook(self, state, bucket):
        if state.iter < state.start_localSGD_iter:
            self.traffic.add(nbytes([bucket.buffer()]))  # the warm-up's gradient allreduce
        return post_localSGD_hook(state, bucket)

    def begin(self, step: int) -> None:
        self.hook_state.iter = self.averager.step = step  # from the trainer's step: right after a resume too

    def accumulation(self, model, last: bool):
        return self.backend.accumulation(model, last)

    def step(self, model, optimizer, scaler, step: int) -> None:
        if not self.schedule.allreduces_gradients(step):
            self.drifted = True
        plain_step(optimizer, scaler)
        due = self.schedule.averages_after(step)  # what the averager decides: its step is ours (begin)
        with self.traffic.sync() if due else contextlib.nullcontext():
            if due:
                self.traffic.add(nbytes(averaging.get_params_to_average(model.parameters())))
            self.averager.average_parameters(model.parameters())
            if due:
                self.backend.average_([b for b in model.module.buffers() if b.is_floating_point()])
