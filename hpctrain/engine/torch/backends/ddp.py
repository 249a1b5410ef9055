"""torch.distributed DistributedDataParallel: gloo on CPU, nccl on GPU. For comparison with Horovod."""
from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hpctrain import netiface
from hpctrain.engine.torch.backends.base import Backend, nbytes, plain_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous(cluster) -> tuple[str, int]:
    """torchrun names a master; otherwise rank 0 publishes its host (the address of the site's interface with
    HPCTRAIN_NET_IFACE) and a free port via MPI."""
    if cluster.master_addr and cluster.master_port:
        return cluster.master_addr, cluster.master_port
    if cluster.size == 1:
        return "127.0.0.1", _free_port()
    from mpi4py import MPI  # only the rendezvous; training traffic goes through torch.distributed
    mine = (cluster.master_addr or netiface.node_address(), _free_port()) if cluster.rank == 0 else None
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
        return self.ddp(model), optimizer

    def ddp(self, model, **options) -> DistributedDataParallel:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **options)

    def step(self, optimizer, scaler=None) -> None:
        # What DDP's buckets handed to the allreduce in this step's backward: every gradient.
        self.traffic.add(nbytes(p for group in optimizer.param_groups for p in group["params"] if p.requires_grad))
        plain_step(optimizer, scaler)

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
        if self.rank == 0 and model.forward_sync_buffers and model.training:  # rank 0's buffers go out each forward
            self.traffic.add(nbytes(model.module.buffers()))
        return super().accumulation(model, last) if last else model.no_sync()

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            # All ranks past their last collective first: a rank tearing gloo down while its peer's loop still
            # reads aborts the peer. Then a moment: a gloo worker thread frees its last work's tensors only after
            # marking it done, and destroy_process_group does not join those threads once a DDP model has
            # existed (it keeps the group referenced); freeing a Python-owned tensor during interpreter
            # shutdown aborts the process (SIGABRT after correct results, seen in loaded test runs).
            dist.barrier()
            time.sleep(0.2)
            dist.destroy_process_group()

    # ---- the strategies' collectives (ZeRO and PowerSGD on ddp are torch's own; these serve the rest) ----------
    def allreduce_(self, flat: torch.Tensor, op: str = "mean") -> None:
        self.traffic.add(nbytes([flat]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if op == "mean":
            flat /= self.size

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor | None:
        send = tensor.detach().reshape(-1).contiguous()
        rows = [torch.empty_like(send) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(send, rows, dst=0)
        return torch.stack(rows) if rows is not None else None

    def allgather_object(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out
