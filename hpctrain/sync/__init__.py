"""Synchronization strategies, framework-neutral: WHAT crosses the network and WHEN. A backend decides HOW the
bytes move (Horovod, torch.distributed, mpi4py); the per-framework parts sit beside their engine
(hpctrain/engine/torch/sync/, hpctrain/engine/tf/sync.py). The training loop knows neither: it only reads the
byte counter every backend fills (hpctrain.metrics.Traffic), once per log window.

    allreduce   every gradient, every step (the backend's own way: Horovod hooks, DDP buckets, one MPI Allreduce)
    local-sgd   each rank steps on its own gradients; parameters and buffers are averaged every `period` steps, after
                `warmup` steps of gradient allreduce (post-local SGD; Lin et al., ICLR 2020). Ranks hold different
                models between averages, so a save or an evaluation first averages them (and the optimizer state):
                every checkpoint is one model.
    powersgd    each gradient matrix sent as rank-r factors P and Q, with error feedback and warm start (Vogels et al.,
                NeurIPS 2019), after `powersgd_start` steps of plain allreduce
    gossip      each rank steps on its own gradients, then mixes its model with one or two peers (`gossip_graph`:
                `ring`, both neighbours; `exponential`, one peer 2^k ranks away, k cycling: SGP's one-peer graph);
                no global collective while training (D-PSGD, Lian et al., NeurIPS 2017; Assran et al., ICML 2019).
                Saves and evaluations average the ranks first, as local SGD does.
    ps          a parameter server: the last `ps_servers` ranks hold the parameters (split by bytes) and the
                optimizer state; workers push gradients and pull parameters every step (synchronous: equal to
                allreduce SGD over the workers; asynchronous: each gradient applied on arrival, a worker at most
                `staleness` steps ahead of the slowest)
    zero        (with allreduce) ZeRO stage 1: the optimizer state sharded over the ranks, each updating its shard;
                checkpoints consolidated to the whole-model format (Rajbhandari et al., SC20)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Local SGD's timing, by the 0-based index of the step being taken (torch's PostLocalSGDState and
    PeriodicModelAverager count the same way): gradients are averaged during the first `warmup` steps; the model
    after step `warmup` and every `period` steps after it."""
    period: int
    warmup: int = 0

    def allreduces_gradients(self, step: int) -> bool:
        return step < self.warmup

    def averages_after(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.period == 0


def gossip_exchanges(rank: int, size: int, step: int, graph: str) -> list[tuple[int, int]]:
    """This rank's exchanges at the 0-based `step`: (send to, receive from) pairs, each one MPI Sendrecv; the
    rank's new model is the plain mean of its own and what it received. Every rank receives as many models as it
    sends and every model reaches as many ranks as it came from, so the mixing matrix is doubly stochastic: the
    average over ranks never moves, only the spread shrinks.

        ring         the two neighbours every step (weights 1/3 each; on 2 ranks the one peer, 1/2)
        exponential  one peer 2^k ranks on, k = step mod ceil(log2 size) (weights 1/2); on 2^m ranks m steps in a
                     row give every rank the exact average"""
    if size < 2:
        return []
    if graph == "ring":
        right, left = (rank + 1) % size, (rank - 1) % size
        return [(right, left)] if size == 2 else [(right, left), (left, right)]
    if graph == "exponential":
        hop = 2 ** (step % math.ceil(math.log2(size)))
        return [((rank + hop) % size, (rank - hop) % size)]
    raise ValueError(f"gossip graph {graph!r} (allowed: ring, exponential)")


@dataclass(frozen=True)
class Policy:
    """The run's synchronization choice (config section [sync]), as the engines read it."""
    strategy: str = "allreduce"
    zero: bool = False
    period: int = 4
    warmup: int = 0
    powersgd_rank: int = 8
    powersgd_start: int = 10
    error_feedback: bool = True
    warm_start: bool = True
    gossip_graph: str = "exponential"
    ps_servers: int = 1
    ps_mode: str = "sync"
    staleness: int = 2

    @classmethod
    def of(cls, cfg) -> Policy:
        """From a whole config (its [sync] section; a config without one syncs the default way)."""
        s = getattr(cfg, "sync", None)
        if s is None:
            return cls()
        return cls(s.strategy, s.zero, s.period, s.warmup, s.powersgd_rank, s.powersgd_start,
                   s.powersgd_error_feedback, s.powersgd_warm_start, s.gossip_graph, s.ps_servers,
                   s.ps_mode, s.staleness)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.period, self.warmup)

    @property
    def default(self) -> bool:
        return self.strategy == "allreduce" and not self.zero

    def describe(self) -> str:
        """For the start line."""
        if self.strategy == "local-sgd":
            first = f" after {self.warmup} step(s) of gradient allreduce" if self.warmup else ""
            text = f"local SGD: the model averaged every {self.period} step(s){first}"
        elif self.strategy == "powersgd":
            options = [name for name, on in (("error feedback", self.error_feedback),
                                             ("warm start", self.warm_start)) if on]
            text = (f"PowerSGD rank {self.powersgd_rank} from step {self.powersgd_start}"
                    + (f" ({', '.join(options)})" if options else ""))
        elif self.strategy == "gossip":
            peers = "its two ring neighbours" if self.gossip_graph == "ring" else "one peer of an exponential graph"
            text = (f"gossip: each step the model mixed with {peers} (no global collective); saves and evaluations "
                    "on the average over ranks")
        elif self.strategy == "ps":
            text = (f"parameter server: the last {self.ps_servers} rank(s) hold the weights and the optimizer, the "
                    "others push gradients and pull weights every step")
            if self.ps_mode == "async":
                text += (f", asynchronously: each gradient applied on arrival, a worker at most {self.staleness} "
                         "step(s) ahead of the slowest")
        else:
            text = "allreduce of every gradient"
        return text + (", ZeRO-1 (optimizer state sharded)" if self.zero else "")
