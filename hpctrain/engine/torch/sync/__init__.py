"""The torch engine's part of the synchronization strategies (hpctrain.sync: what crosses the network and when):
one class per strategy and backend family, chosen once by `make_sync`.

    base.py       `Sync`: the protocol the data-parallel plan drives, and allreduce (the backend's own way)
    local_sgd.py  `LocalSGD` (horovod, mpi: the backend's fused allreduce), `PostLocalSGD` (ddp: torch's hook and
                  PeriodicModelAverager)
    powersgd.py   `PowerSGD` (horovod, mpi: torch's algorithm over the backend's allreduce), `TorchPowerSGD` (ddp:
                  torch's powerSGD_hook)
    ps.py         `ParameterServer` (every backend: mpi4py sends to and from the server ranks; ZeRO's sharded
                  optimizer with the servers as the only owners)
    gossip.py     `Gossip` (every backend: mpi4py Sendrecv with the step's peers; saves average like local SGD)
    zero.py       `Zero` + `ShardedOptimizer` (horovod, mpi: reduce-scatter, allgather), `TorchZero` (ddp:
                  ZeroRedundancyOptimizer)
"""
from __future__ import annotations

from hpctrain.engine.torch.sync.base import Sync
from hpctrain.sync import Policy


def make_sync(backend, policy: Policy) -> Sync:
    """The strategy of `policy` on `backend`: torch's own implementation on ddp, the backend's collectives
    elsewhere."""
    torch_own = backend.name == "ddp"
    if policy.zero:
        from hpctrain.engine.torch.sync.zero import TorchZero, Zero
        return (TorchZero if torch_own else Zero)(backend, policy)
    if policy.strategy == "local-sgd":
        from hpctrain.engine.torch.sync.local_sgd import LocalSGD, PostLocalSGD
        return (PostLocalSGD if torch_own else LocalSGD)(backend, policy)
    if policy.strategy == "powersgd":
        from hpctrain.engine.torch.sync.powersgd import PowerSGD, TorchPowerSGD
        return (TorchPowerSGD if torch_own else PowerSGD)(backend, policy)
    if policy.strategy == "ps":
        from hpctrain.engine.torch.sync.ps import ParameterServer
        return ParameterServer(backend, policy)
    if policy.strategy == "gossip":
        from hpctrain.engine.torch.sync.gossip import Gossip
        return Gossip(backend, policy)
    return Sync(backend, policy)


__all__ = ["Policy", "Sync", "make_sync"]
