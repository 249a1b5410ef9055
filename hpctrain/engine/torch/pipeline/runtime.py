"""Pipeline x data parallel over mpi4py: a P x D grid of ranks, stages that pass activations forward
and gradients backward with non-blocking point-to-point on contiguous buffers, GPipe / 1F1B schedules,
and each stage's gradients averaged over its D replicas on one fused buffer.

Rank r holds stage r // D of replica r % D: the D ranks of a stage are neighbours (same node when
D divides the ranks per node), since their gradient allreduce moves more bytes than the activations.
"""
from __future__ import annotations

import contextlib

import torch
from mpi4py import MPI
from torch import nn

from hpctrain.pipeline.schedule import ops_for

_META = 1 << 20  # tag of the per-step (shape, dtype) message; data tags are 2i (activation) and 2i+1 (gradient)


class Grid:
    """COMM_WORLD split into `pipe` (the P stages of one replica, rank == stage) and `data` (the D
    replicas of one stage), plus one communicator per set of stages that share a tied parameter."""

    def __init__(self, comm, stages: int):
        size, rank = comm.Get_size(), comm.Get_rank()
        if stages < 1 or size % stages:
            raise ValueError(f"pipeline.stages (--pipeline-stages): {stages} does not divide the {size} ranks "
                             f"(allowed: {', '.join(str(p) for p in range(1, size + 1) if size % p == 0)})")
        self.world, self.stages, self.replicas = comm, stages, size // stages
        self.stage, self.replica = divmod(rank, self.replicas)
        self.pipe = comm.Split(color=self.replica, key=self.stage)
        self.data = comm.Split(color=self.stage, key=self.replica)
        self.is_first, self.is_last = self.stage == 0, self.stage == stages - 1

    def tie_comms(self, stage_sets: list[tuple[int, ...]]) -> dict[tuple[int, ...], object]:
        """One communicator per set of stages sharing parameters (collective over `pipe`, same order everywhere)."""
        comms = {}
        for stages in stage_sets:
            comm = self.pipe.Split(color=0 if self.stage in stages else MPI.UNDEFINED, key=self.stage)
            if self.stage in stages:
                comms[stages] = comm
        return comms


def as_buffer(t: torch.Tensor):
    """A CPU contiguous tensor as a numpy view (no copy) that mpi4py can send from / receive into."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


class MPIReducer:
    """Average a fused gradient buffer over the stage's replicas with one in-place MPI Allreduce."""
    name = "mpi"

    def __init__(self, grid: Grid):
        self.comm, self.size = grid.data, grid.replicas

    def __call__(self, flat: torch.Tensor) -> None:
        host = flat if flat.device.type == "cpu" else flat.cpu()
        self.comm.Allreduce(MPI.IN_PLACE, as_buffer(host), op=MPI.SUM)
        host /= self.size
        if host is not flat:
            flat.copy_(host)


class HorovodReducer:
    """The same average through Horovod, one process set per stage (NCCL on GPUs)."""
    name = "horovod"

    def __init__(self, grid: Grid):
        import horovod.torch as hvd
        d = grid.replicas
        self.hvd = hvd
        sets = [hvd.ProcessSet(list(range(s * d, (s + 1) * d))) for s in range(grid.stages)]
        hvd.init(comm=grid.world, process_sets=sets)
        self.process_set = sets[grid.stage]

    def __call__(self, flat: torch.Tensor) -> None:
        self.hvd.allreduce_(flat, op=self.hvd.Average, process_set=self.process_set, name="hpctrain.pipeline.grads")


REDUCERS = {"mpi": MPIReducer, "horovod": HorovodReducer}


class PipelineStage:
    """The blocks of one stage and the schedule that runs them.

    `step(batches)` runs M micro-batches through the pipeline (forward, backward, gradients reduced
    over replicas and summed over tied copies) and returns the last stage's [loss x n, correct, n]
    (zeros elsewhere). Gradients live in one flat buffer; parameters' .grad are views into it."""

    def __init__(self, blocks: list[nn.Module], grid: Grid, task, device: torch.device, schedule: str,
                 micro_batches: int, tied: dict[tuple[int, ...], list[nn.Parameter]] | None = None,
                 reducer: str = "mpi", autocast=None):
        self.blocks, self.grid, self.task, self.device = blocks, grid, task, device
        self.micro_batches, self.autocast = micro_batches, autocast or contextlib.nullcontext
        self.ops = ops_for(schedule, grid.stages, micro_batches, grid.stage)
        self.params = list({id(p): p for b in blocks for p in b.parameters() if p.requires_grad}.values())
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(f"stage {grid.stage}: parameters of several dtypes {sorted(map(str, dtypes))}; "
                             "the fused gradient buffer needs one")
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype if self.params
                                else torch.float32, device=device)
        self._bind_grads()
        # `tied` names every set of stages sharing parameters (all ranks create all tie communicators),
        # with this stage's copies of them (empty where this stage is not in the set).
        self.tied = tied or {}
        self.tie_comms = grid.tie_comms(sorted(self.tied))
        self.reduce = REDUCERS[reducer](grid) if grid.replicas > 1 else None
        self.peak_in_flight = 0  # most micro-batches held for backward at once, over all steps
        self._sent_meta = None
        self._seed = getattr(task, "seed_stage", None)

    def _bind_grads(self) -> None:
        offset, self._grad_ptrs = 0, []
        for p in self.params:
            p.grad = self.flat[offset:offset + p.numel()].view_as(p)
            self._grad_ptrs.append(p.grad.data_ptr())
            offset += p.numel()

    def zero_grad(self) -> None:
        if any(p.grad is None or p.grad.data_ptr() != ptr for p, ptr in zip(self.params, self._grad_ptrs)):
            self._bind_grads()  # something replaced a .grad (optimizer.zero_grad): point it back into the buffer
        self.flat.zero_()

    # ---- point to point ------------------------------------------------------------------------
    def _isend(self, t: torch.Tensor, dest: int, tag: int, pending: list) -> None:
        host = t.detach().contiguous().cpu()  # CPU staging: a GPU tensor goes through host memory
        pending.append((self.grid.pipe.Isend(as_buffer(host), dest=dest, tag=tag), host))

    def _irecv(self, meta, source: int, tag: int):
        shape, dtype = meta
        host = torch.empty(shape, dtype=dtype)
        return self.grid.pipe.Irecv(as_buffer(host), source=source, tag=tag), host

    def _wait(self, posted) -> torch.Tensor:
        request, host = posted
        request.Wait()
        return host.to(self.device, non_blocking=True)

    def _forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        with self.autocast():
            for block in self.blocks:
                x = block(x, batch)
        return x

    # ---- one training step -----------------------------------------------------------------------
    def step(self, batches: list) -> torch.Tensor:
        g, M = self.grid, len(batches)
        if M != self.micro_batches:
            raise ValueError(f"stage {g.stage}: {M} micro-batches, the schedule was built for {self.micro_batches}")
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        held: dict[int, tuple] = {}
        pending: list = []
        acts: dict[int, tuple] = {}
        grads: dict[int, tuple] = {}
        meta = None
        if not g.is_first:
            meta = g.pipe.recv(source=g.stage - 1, tag=_META)  # shape/dtype of this step's activations
            acts[0] = self._irecv(meta, g.stage - 1, 0)
        for kind, i in self.ops:
            batch = batches[i]
            if kind == "F":
                if self._seed:
                    self._seed(batch, g.stage)
                if g.is_first:
                    x = self.task.inputs(batch)
                else:
                    x = self._wait(acts.pop(i)).requires_grad_(meta[1].is_floating_point)
                    if i + 1 < M:  # post the next receive now: it overlaps this micro-batch's compute
                        acts[i + 1] = self._irecv(meta, g.stage - 1, 2 * (i + 1))
                y = self._forward(x, batch)
                if g.is_last:
                    loss, batch_stats = self.task.loss(y, batch)
                    stats += batch_stats
                    held[i] = (x, loss / M)  # mean over the step's micro-batches, as in accumulation
                else:
                    out_meta = (tuple(y.shape), y.dtype)
                    if i == 0:
                        pending.append((g.pipe.isend(out_meta, dest=g.stage + 1, tag=_META), None))
                        self._sent_meta = out_meta
                    elif out_meta != self._sent_meta:
                        raise ValueError(f"stage {g.stage}: micro-batch {i} output {out_meta} differs from "
                                         f"micro-batch 0's {self._sent_meta}: micro-batches must have equal shapes")
                    self._isend(y, g.stage + 1, 2 * i, pending)
                    grads[i] = self._irecv(out_meta, g.stage + 1, 2 * i + 1)
                    held[i] = (x, y)
                self.peak_in_flight = max(self.peak_in_flight, len(held))
            else:
                x, y = held.pop(i)
                if g.is_last:
                    y.backward()
                else:
                    torch.autograd.backward(y, self._wait(grads.pop(i)))
                if not g.is_first:
                    self._isend(x.grad, g.stage - 1, 2 * i + 1, pending)
        MPI.Request.Waitall([r for r, _ in pending])
        self._combine_grads()
        return stats

    def _combine_grads(self) -> None:
        # Tied copies (BERT's word embeddings / MLM decoder): each stage holds part of the gradient; sum them.
        for stages, comm in self.tie_comms.items():
            for p in self.tied[stages]:
                host = p.grad if p.grad.device.type == "cpu" else p.grad.cpu()
                comm.Allreduce(MPI.IN_PLACE, as_buffer(host), op=MPI.SUM)
                if host is not p.grad:
                    p.grad.copy_(host)
        if self.reduce is not None:
            self.reduce(self.flat)  # data parallel: average over the replicas of this stage

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_only(self, batch) -> torch.Tensor:
        """One batch through the stages, no schedule (evaluation; the last batch may be smaller)."""
        g = self.grid
        if g.is_first:
            x = self.task.inputs(batch)
        else:
            shape, dtype = g.pipe.recv(source=g.stage - 1, tag=_META)
            host = torch.empty(shape, dtype=dtype)
            g.pipe.Recv(as_buffer(host), source=g.stage - 1, tag=0)
            x = host.to(self.device)
        y = self._forward(x, batch)
        if g.is_last:
            return self.task.loss(y, batch)[1]
        host = y.contiguous().cpu()
        g.pipe.send((tuple(host.shape), host.dtype), dest=g.stage + 1, tag=_META)
        g.pipe.Send(as_buffer(host), dest=g.stage + 1, tag=0)
        return torch.zeros(3, dtype=torch.float64, device=self.device)
