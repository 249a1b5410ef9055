"""Gossip averaging (decentralized SGD: D-PSGD, Lian et al., NeurIPS 2017; the one-peer exponential graph of
Stochastic Gradient Push, Assran et al., ICML 2019): each rank steps on its own gradients, then mixes its model
with its peers of the step (hpctrain.sync.gossip_exchanges): one MPI Sendrecv per peer, no global collective.

No maintained engine offers it for CPU clusters (SGP's reference code, Bagua and fairscale's SlowMo are
unmaintained or CUDA-only), so the exchanges are mpi4py's, on whatever backend the run uses (its world must be
MPI's: mpirun, srun, horovodrun over MPI). Between saves the ranks hold different models and optimizer states,
exactly as under local SGD, whose `settle` this inherits: a save or an evaluation first averages the ranks (one
allreduce), so every checkpoint is one model in today's format, and a resumed run continues as an uninterrupted
one. On 2 ranks, gossip is local SGD with K = 1 (the peer's model is the only other one), step for step.

What is logged (hpctrain.metrics.DISTANCES): `peer_distance`, the L2 distance to each model mixed with (free: both
are at hand), and `consensus_distance`, the distance to the average over ranks at each settle."""
from __future__ import annotations

import torch
from mpi4py import MPI

from hpctrain.config import ConfigError
from hpctrain.engine.runtime import check_world
from hpctrain.engine.torch.backends.base import nbytes, plain_step
from hpctrain.engine.torch.pipeline.runtime import as_buffer
from hpctrain.engine.torch.sync.base import model_tensors
from hpctrain.engine.torch.sync.local_sgd import LocalSGD
from hpctrain.sync import gossip_exchanges


class Gossip(LocalSGD):
    name = "gossip"

    def __init__(self, backend, policy):
        super().__init__(backend, policy)
        if backend.size < 2:
            raise ConfigError(f"sync.strategy (--sync): 'gossip' mixes models between ranks, but this job has "
                              f"{backend.size} rank (allowed on one rank: --sync allreduce)")
        self.comm = MPI.COMM_WORLD
        check_world(self.comm.Get_rank(), self.comm.Get_size(), backend.cluster, "mpi4py (gossip's exchanges)")
        self.graph = policy.gossip_graph
        self._flat = self._received = None

    def step(self, model, optimizer, scaler, step: int) -> None:
        plain_step(optimizer, scaler)
        self.drifted = True
        self.mix(model_tensors(self.backend.unwrap(model)), step)

    def _fused(self, tensors: list) -> torch.Tensor:
        n = sum(t.numel() for t in tensors)
        if self._flat is None or self._flat.numel() != n or self._flat.dtype != tensors[0].dtype:
            self._flat = torch.empty(n, dtype=tensors[0].dtype)
            self._received = torch.empty_like(self._flat)
        torch.cat([t.detach().reshape(-1) for t in tensors], out=self._flat)
        return self._flat

    def mix(self, tensors: list, step: int) -> None:
        """This rank's model becomes the mean of its own and its peers' of this step (one Sendrecv each)."""
        exchanges = gossip_exchanges(self.rank, self.backend.size, step, self.graph)
        flat = self._fused(tensors)
        mixed = flat.clone()
        with self.traffic.sync():
            for dest, source in exchanges:
                self.traffic.add(nbytes([flat]))
                self.comm.Sendrecv(as_buffer(flat), dest=dest, recvbuf=as_buffer(self._received), source=source)
                mixed += self._received
                self.traffic.distance("peer_distance", float(torch.linalg.vector_norm(flat - self._received)))
        mixed /= len(exchanges) + 1
        offset = 0
        for t in tensors:
            t.detach().copy_(mixed[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def settle(self, model, optimizer, scaler) -> bool:
        if not self.drifted:
            return False
        tensors = model_tensors(self.backend.unwrap(model))
        before = self._fused(tensors).clone()
        super().settle(model, optimizer, scaler)
        self.traffic.distance("consensus_distance", float(torch.linalg.vector_norm(before - self._fused(tensors))))
        return True
