"""A parameter server over MPI (synchronous): the last `ps_servers` ranks of the job are servers, the others
workers. The flat parameters are split over the servers by bytes; each server holds the optimizer state of its
range and applies the updates. Every step each worker pushes each server its range of the gradient (one MPI Send
per server), the server averages the workers' gradients (in worker order), steps, and sends the updated range back
to every worker: the same update as allreduce SGD on the workers' global batch, element for element.

No maintained engine offers this to an HPC user: Keras 3 does not support TensorFlow's ParameterServerStrategy
(keras-team/keras#18624) and the RPC framework of PyTorch's parameter-server tutorial is in maintenance mode. It is
ZeRO-1's sharded optimizer (zero.py) with dedicated owners and point-to-point transport instead of a reduce-scatter
and an allgather, so checkpoints are consolidated the same way (whole-model format: a PS run resumes on the allreduce
path and the other way round).

Placement: servers last, so rank 0 stays a worker (it logs, evaluates and writes checkpoints from its whole model).
The data is split over the workers; servers read none and skip evaluations. Every parameter is stepped every step
(a parameter no worker used gets a zero gradient: with momentum or weight decay it still moves)."""
from __future__ import annotations

import contextlib

import torch
from mpi4py import MPI

from hpctrain.config import ConfigError
from hpctrain.engine.runtime import check_world
from hpctrain.engine.torch.backends.base import nbytes, split_counts
from hpctrain.engine.torch.pipeline.runtime import as_buffer
from hpctrain.engine.torch.sync.zero import ShardedOptimizer, Zero

GRADIENT, PARAMETERS = 71, 72  # message tags


def check_servers(servers: int, size: int) -> None:
    if not 1 <= servers < size:
        raise ConfigError(f"sync.ps_servers (--ps-servers): {servers} server(s) leave no worker among the {size} "
                          f"rank(s) of this job (allowed: 1 to {size - 1})")


def assign_roles(backend, servers: int) -> None:
    """Split the world: the data goes over the workers (a server takes a worker's data rank only so its sampler
    has the same length; it reads nothing)."""
    check_servers(servers, backend.size)
    workers = backend.size - servers
    backend.data_size, backend.data_rank = workers, backend.rank % workers


class ServerShards(ShardedOptimizer):
    """ZeRO-1's flat buffers, the optimizer's ranges owned by the servers only (a worker owns none)."""

    def __init__(self, optimizer, backend, servers: int, comm):
        self.comm, self.workers = comm, backend.size - servers
        super().__init__(optimizer, backend, split=lambda total: [0] * self.workers + split_counts(total, servers))
        self.serves = backend.rank >= self.workers
        self.ranges = [(sum(self.counts[:r]), sum(self.counts[:r + 1])) for r in range(backend.size)]
        self._received = [torch.empty(self.hi - self.lo, dtype=self.flat.dtype) for _ in range(self.workers)] \
            if self.serves else []

    def reduce_gradients(self) -> None:
        if not self.serves:  # push: each server its range of this worker's gradient
            sends = []
            for server in range(self.workers, self.backend.size):
                lo, hi = self.ranges[server]
                self.backend.traffic.add(nbytes([self.grads[lo:hi]]))
                sends.append(self.comm.Isend(as_buffer(self.grads[lo:hi]), dest=server, tag=GRADIENT))
            MPI.Request.Waitall(sends)
            return
        receives = [self.comm.Irecv(as_buffer(buf), source=w, tag=GRADIENT) for w, buf in enumerate(self._received)]
        MPI.Request.Waitall(receives)
        mean = self._received[0].clone()
        for buf in self._received[1:]:
            mean += buf  # in worker order: the same sum on every run
        mean /= self.workers
        for _, _, view, at in self.pieces:
            view.grad = mean[at:at + view.numel()]

    def step(self, closure=None):
        if self.serves:
            self.local.step()
            mine = self.flat[self.lo:self.hi]
            self.backend.traffic.add(nbytes([mine]) * self.workers)
            MPI.Request.Waitall([self.comm.Isend(as_buffer(mine), dest=w, tag=PARAMETERS)
                                 for w in range(self.workers)])
            return
        receives = []  # pull: every server's updated range into the flat parameters (the model's)
        for server in range(self.workers, self.backend.size):
            lo, hi = self.ranges[server]
            receives.append(self.comm.Irecv(as_buffer(self.flat[lo:hi]), source=server, tag=PARAMETERS))
        MPI.Request.Waitall(receives)


class ParameterServer(Zero):
    name = "ps"

    def __init__(self, backend, policy):
        super().__init__(backend, policy)
        self.servers = policy.ps_servers
        check_servers(self.servers, backend.size)
        self.comm = MPI.COMM_WORLD
        check_world(self.comm.Get_rank(), self.comm.Get_size(), backend.cluster, "mpi4py (the parameter server's)")
        self.serves = backend.rank >= backend.size - self.servers

    def wrap(self, model, optimizer):
        return model, ServerShards(optimizer, self.backend, self.servers, self.comm)

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()

    def step(self, model, optimizer, scaler, step: int) -> None:
        optimizer.reduce_gradients()
        optimizer.step()

    def settle(self, model, optimizer, scaler) -> bool:
        """The weights are the same on every worker; BatchNorm's running statistics are averaged over the workers
        only (a server's never saw data)."""
        workers = self.backend.size - self.servers
        for buf in self.backend.unwrap(model).buffers():
            if buf.is_floating_point():
                mine = torch.zeros_like(buf) if self.serves else buf
                buf.copy_(self.backend.allreduce(mine, "sum") / workers)
        return True
