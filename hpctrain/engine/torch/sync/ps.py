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
import time

import torch
from mpi4py import MPI

from hpctrain.config import ConfigError
from hpctrain.engine.runtime import check_world
from hpctrain.engine.torch.backends.base import nbytes, split_counts
from hpctrain.engine.torch.pipeline.runtime import as_buffer
from hpctrain.engine.torch.sync.zero import ShardedOptimizer, Zero

GRADIENT, PARAMETERS, SETTLE = 71, 72, 73  # message tags
# A server waits by polling with this pause: MPI's blocking waits spin a core, which on a small node is a worker's
# (measured on 2 cores, 2 workers + 1 server: the server at 0.52 CPU synchronous, 0.70 asynchronous, spinning).
POLL_S = 0.0005


def wait(requests) -> None:
    """Wait for every request without spinning a core (a server's waits)."""
    while not MPI.Request.Testall(requests):
        time.sleep(POLL_S)


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
    """ZeRO-1's flat buffers, the optimizer's ranges owned by the servers only (a worker owns none).

    A worker's step, `exchange()`: post the receives of every server's updated range, push each server its range of
    the gradient, wait for all (receives first: a server's reply never waits for the worker's push to another
    server). A server's step, `serve()`: synchronous, every worker's gradient received, averaged in worker order,
    one optimizer step, the range sent back to every worker; asynchronous, each gradient applied on arrival with
    1/workers of the step's learning rate (for SGD the same as 1/workers of the gradient; for Adam, whose step does
    not scale with the gradient, the only way W arrivals make one step's worth) and the reply held back while its
    worker is more than `staleness` pushes ahead of the slowest (stale synchronous parallel, Ho et al., NIPS 2013);
    the server's step ends once every worker pushed once more."""

    def __init__(self, optimizer, backend, servers: int, comm, staleness: int | None = None):
        self.comm, self.workers, self.staleness = comm, backend.size - servers, staleness
        super().__init__(optimizer, backend, split=lambda total: [0] * self.workers + split_counts(total, servers))
        self.serves = backend.rank >= self.workers
        self.ranges = [(sum(self.counts[:r]), sum(self.counts[:r + 1])) for r in range(backend.size)]
        self._received = [torch.empty(self.hi - self.lo, dtype=self.flat.dtype) for _ in range(self.workers)] \
            if self.serves else []
        # asynchronous serving: gradients received per worker, updates applied, the update each worker last pulled,
        # workers waiting for their reply; the record: how far ahead each reply let its worker go (its push count
        # minus the slowest's) and how many updates old each applied gradient's weights were
        self.pushed, self.pulled_at = [0] * self.workers, [0] * self.workers
        self.updates, self.served, self.pending = 0, 0, []
        self.leads = [[0] * ((staleness or 0) + 1) for _ in range(self.workers)]
        self.staleness_seen: dict[int, int] = {}
        if staleness is not None:  # every rank: the window's reduction carries it; bins past what SSP allows
            backend.traffic.histogram("staleness_histogram", self.workers, (self.workers - 1) * (staleness + 2) + 2)

    def exchange(self) -> None:
        """A worker's step: the gradient pushed, the updated weights pulled."""
        servers = range(self.workers, self.backend.size)
        requests = [self.comm.Irecv(as_buffer(self.flat[lo:hi]), source=s, tag=PARAMETERS)
                    for s, (lo, hi) in ((s, self.ranges[s]) for s in servers)]
        for s in servers:
            lo, hi = self.ranges[s]
            self.backend.traffic.add(nbytes([self.grads[lo:hi]]))
            requests.append(self.comm.Isend(as_buffer(self.grads[lo:hi]), dest=s, tag=GRADIENT))
        MPI.Request.Waitall(requests)

    def serve(self) -> None:
        (self._serve_sync if self.staleness is None else self._serve_async)()

    def _set_gradient(self, flat: torch.Tensor) -> None:
        for _, _, view, at in self.pieces:
            view.grad = flat[at:at + view.numel()]

    def _reply(self, workers) -> list:
        mine = self.flat[self.lo:self.hi]
        self.backend.traffic.add(nbytes([mine]) * len(workers))
        return [self.comm.Isend(as_buffer(mine), dest=w, tag=PARAMETERS) for w in workers]

    def _serve_sync(self) -> None:
        wait([self.comm.Irecv(as_buffer(buf), source=w, tag=GRADIENT) for w, buf in enumerate(self._received)])
        mean = self._received[0].clone()
        for buf in self._received[1:]:
            mean += buf  # in worker order: the same sum on every run
        self._set_gradient(mean.div_(self.workers))
        self.local.step()
        wait(self._reply(range(self.workers)))

    def _serve_async(self) -> None:
        target, sends, status = self.served + 1, [], MPI.Status()
        received = self._received[0]
        for group in self.local.param_groups:  # the step's LR (set by the trainer) shared by the workers' updates:
            group["lr"] /= self.workers       # SGD's as scaling each gradient; Adam's, decay's too (scale-free)
        while min(self.pushed) < target:
            while not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=GRADIENT, status=status):
                time.sleep(POLL_S)
            w = status.Get_source()
            self.comm.Recv(as_buffer(received), source=w, tag=GRADIENT)
            self.pushed[w] += 1
            stale = self.updates - self.pulled_at[w]
            self.staleness_seen[stale] = self.staleness_seen.get(stale, 0) + 1
            self.backend.traffic.distance("staleness", stale)
            self.backend.traffic.count("staleness_histogram", w, stale)
            self._set_gradient(received)
            self.local.step()
            self.updates += 1
            self.pending.append(w)
            slowest, waiting = min(self.pushed), []
            for p in self.pending:
                lead = self.pushed[p] - slowest
                if lead > self.staleness:
                    waiting.append(p)  # too far ahead: its reply waits for the slowest
                    continue
                self.leads[p][lead] += 1
                sends += self._reply([p])
                self.pulled_at[p] = self.updates
            self.pending = waiting
            wait(sends)  # each reply is from the weights as they are now
            sends = []
        self.served = target

    def pull_latest(self) -> None:
        """Before a save or an evaluation: every worker takes the servers' current weights (asynchronous serving
        leaves the workers each with the weights of its own last reply)."""
        if self.serves:
            wait(self._reply_settle())
            return
        MPI.Request.Waitall([self.comm.Irecv(as_buffer(self.flat[lo:hi]), source=s, tag=SETTLE)
                             for s, (lo, hi) in ((s, self.ranges[s]) for s in range(self.workers, self.backend.size))])

    def _reply_settle(self) -> list:
        mine = self.flat[self.lo:self.hi]
        return [self.comm.Isend(as_buffer(mine), dest=w, tag=SETTLE) for w in range(self.workers)]

    def record(self) -> dict:
        """A server's record of its asynchronous serving: per worker, how many replies let it go how far ahead of
        the slowest worker (index = pushes ahead), and how often an applied gradient was computed on weights that
        many updates old."""
        return {"leads": [list(row) for row in self.leads], "staleness": dict(sorted(self.staleness_seen.items())),
                "bound": self.staleness, "updates": self.updates}


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
        staleness = self.policy.staleness if self.policy.ps_mode == "async" else None
        return model, ServerShards(optimizer, self.backend, self.servers, self.comm, staleness)

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()

    def step(self, model, optimizer, scaler, step: int) -> None:
        (optimizer.serve if self.serves else optimizer.exchange)()

    def settle(self, model, optimizer, scaler) -> bool:
        """Every worker the servers' current weights (synchronous: it has them already); BatchNorm's running
        statistics averaged over the workers only (a server's never saw data)."""
        if optimizer.staleness is not None:
            optimizer.pull_latest()
        workers = self.backend.size - self.servers
        for buf in self.backend.unwrap(model).buffers():
            if buf.is_floating_point():
                mine = torch.zeros_like(buf) if self.serves else buf
                buf.copy_(self.backend.allreduce(mine, "sum") / workers)
        return True
