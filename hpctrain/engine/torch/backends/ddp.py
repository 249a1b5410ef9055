"""torch.distributed DistributedDataParallel: gloo on CPU, nccl on GPU. For comparison with Horovod."""
from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hpctrain.engine.torch.backends.base import Backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous(cluster) -> tuple[str, int]:
    """torchrun names a master; otherwise rank 0 publishes its host and a free port via MPI."""
    if cluster.master_addr and cluster.master_port:
        return cluster.master_addr, cluster.master_port
    if cluster.size == 1:
        return "127.0.0.1", _free_port()
    from mpi4py import MPI  # only the rendezvous; training traffic goes through torch.distributed
    mine = (cluster.master_addr or socket.gethostname(), _free_port()) if cluster.rank == 0 else None
    return MPI.COMM_WORLD.bcast(mine, root=0)


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, cfg, cluster, device):
        super().__init__(cfg, cluster, device)
        addr, port = _rendezvous(cluster)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=cluster.rank, world_size=cluster.size, timeout=timedelta(minutes=10))

    def wrap(self, model, optimizer):
        # DDP: buckets gradients and allreduces them during backward, like Horovod's fusion buffer.
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), optimizer

    def unwrap(self, model):
        return model.module if isinstance(model, DistributedDataParallel) else model

    def broadcast_tensors(self, tensors: dict) -> None:
        for t in tensors.values():
            dist.broadcast(t, src=0)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def allreduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.size if op == "mean" else out

    def accumulation(self, model, last: bool):
        return super().accumulation(model, last) if last else model.no_sync()

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            # All ranks past their last collective first: a rank tearing gloo down while its peer's
            # loop still reads aborts the peer (SIGABRT at exit, seen once in CI after correct results).
            dist.barrier()
            dist.destroy_process_group()
