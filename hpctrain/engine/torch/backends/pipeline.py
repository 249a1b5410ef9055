"""Pipeline x data parallel: world collectives (metrics, stop agreement, broadcasts) over mpi4py.

Gradients are not combined here: each pipeline stage averages its own over its replicas
(hpctrain.engine.torch.pipeline.runtime). This backend owns the P x D grid the stages run on."""
from __future__ import annotations

import sys
import traceback

import torch
from mpi4py import MPI

from hpctrain.engine.runtime import check_world
from hpctrain.engine.torch.backends.base import Backend
from hpctrain.engine.torch.pipeline.runtime import Grid, as_buffer


class PipelineBackend(Backend):
    name = "pipeline"

    def __init__(self, cfg, cluster, device, stages: int):
        super().__init__(cfg, cluster, device)
        comm = MPI.COMM_WORLD
        check_world(comm.Get_rank(), comm.Get_size(), cluster, "mpi4py")
        self.grid = Grid(comm, stages)
        sys.excepthook = _abort_job
        self.data_rank, self.data_size = self.grid.replica, self.grid.replicas

    def broadcast_object(self, obj):
        return self.grid.world.bcast(obj, root=0)

    def allreduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        host = tensor.detach().cpu().clone()
        self.grid.world.Allreduce(MPI.IN_PLACE, as_buffer(host), op=MPI.SUM)
        if op == "mean":
            host /= self.size
        return host.to(tensor.device)

    def barrier(self) -> None:
        self.grid.world.Barrier()


def _abort_job(kind, value, tb) -> None:
    """An uncaught error on one rank ends the whole job: its pipeline neighbours would otherwise wait in
    a receive forever (Horovod's background thread does this for the data-parallel backends)."""
    traceback.print_exception(kind, value, tb)
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(1)
