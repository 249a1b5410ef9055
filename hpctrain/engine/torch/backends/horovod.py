"""Horovod: ring-allreduce over MPI (or Gloo under horovodrun --gloo), hooked into the optimizer."""
from __future__ import annotations

import horovod.torch as hvd
import torch

from hpctrain.engine.horovod import ObjectBroadcast, start_horovod
from hpctrain.engine.torch.backends.base import Backend, nbytes


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, cfg, cluster, device):
        super().__init__(cfg, cluster, device)
        start_horovod(hvd, cfg, cluster, on_gpu=device.type == "cuda")
        self.broadcast_object = ObjectBroadcast(hvd)

    def wrap(self, model, optimizer):
        # Horovod: gradients are allreduced by hooks as backward produces them, overlapping compute.
        optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if self.cfg.fp16_allreduce else hvd.Compression.none,
            op=hvd.Adasum if self.cfg.adasum else hvd.Average,
            backward_passes_per_step=self.cfg.accumulate)
        return model, optimizer

    def broadcast_tensors(self, tensors: dict) -> None:
        hvd.broadcast_parameters(tensors, root_rank=0)

    def allreduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return hvd.allreduce(tensor, op=hvd.Average if op == "mean" else hvd.Sum)

    def step(self, optimizer, scaler=None) -> None:
        # What the DistributedOptimizer's hooks hand to Horovod this step: every gradient (fp16 when compressed).
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.traffic.add(sum(p.numel() for p in params) * 2 if self.cfg.fp16_allreduce else nbytes(params))
        if scaler is None:
            optimizer.step()
            return
        # Horovod + loss scaling: finish the allreduce before unscaling, then step without re-syncing.
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()

    def barrier(self) -> None:
        hvd.barrier()

    def shutdown(self) -> None:
        hvd.shutdown()

    # ---- the strategies' collectives: Horovod's own, named alike on every rank (same order, sizes in the names) ----
    def allreduce_(self, flat: torch.Tensor, op: str = "mean") -> None:
        self.traffic.add(nbytes([flat]))
        hvd.allreduce_(flat, op=hvd.Average if op == "mean" else hvd.Sum, name=f"hpctrain.sync.{op}.{flat.numel()}")

    def reduce_scatter(self, flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
        self.traffic.add(nbytes([flat]))
        mine = hvd.reducescatter(flat, op=hvd.Average, name=f"hpctrain.sync.rs.{flat.numel()}")
        if mine.numel() != counts[self.rank]:
            raise RuntimeError(f"Horovod's reducescatter gave rank {self.rank} {mine.numel()} elements, expected "
                               f"{counts[self.rank]}")
        return mine

    def allgather(self, mine: torch.Tensor, counts: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        self.traffic.add(nbytes([mine]))
        full = hvd.allgather(mine.contiguous(), name=f"hpctrain.sync.ag.{sum(counts)}")
        return full if out is None else out.copy_(full)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor | None:
        rows = hvd.allgather(tensor.detach().reshape(1, -1).contiguous(), name=f"hpctrain.rows.{tensor.numel()}")
        return rows if self.rank == 0 else None

    def allgather_object(self, obj) -> list:
        self.objects = getattr(self, "objects", 0) + 1  # unique, equal names on every rank (as ObjectBroadcast)
        return hvd.allgather_object(obj, name=f"hpctrain.allgather_object.{self.objects}")
