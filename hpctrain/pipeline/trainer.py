"""The Trainer, pipelined: the model is split into stages by a partition plan; each rank trains its
stage of one data-parallel replica. The loop, logging, preemption and checkpoint retention are the
Trainer's; the step, evaluation and state handling move through the stage grid.

Every rank builds the full model on the CPU (same seed: same initial weights) and moves only its
stage's blocks to the device. Checkpoints hold the whole model under the usual "model" key (stage
leaders send their parts to rank 0), so a pipelined run's checkpoint also loads without a pipeline."""
from __future__ import annotations

from pathlib import Path

import torch
from mpi4py import MPI
from torch import nn

from hpctrain import watchdog
from hpctrain.checkpoint import CheckpointError
from hpctrain.engine.torch import Classification, Trainer, build_optimizer, to_device
from hpctrain.pipeline.partition import PartitionError, Plan, partition
from hpctrain.pipeline.profile import combine, profile_blocks
from hpctrain.pipeline.runtime import PipelineStage, as_buffer
from hpctrain.pipeline.schedule import activation_slots

PLAN_FILE = "pipeline_plan.json"


def make_plan(blocks, task, sample_batch, grid, cfg, device, autocast=None, log=print) -> Plan:
    """A plan given as a file, or the one a previous (requeued) run saved in run_dir, or a new one
    from costs profiled on every rank (median per block). Rank 0 decides; every rank gets the same plan."""
    p, names = cfg.pipeline, [n for n, _ in blocks]
    if p.stages > len(blocks):  # before profiling: say it now, not after a minute of timing blocks
        raise PartitionError(f"pipeline.stages (--pipeline-stages): {p.stages} stages for a model of {len(blocks)} "
                             f"blocks ({names[0]} .. {names[-1]}): allowed 1..{len(blocks)}")
    saved = Path(cfg.run.run_dir) / PLAN_FILE
    found = None
    if grid.world.Get_rank() == 0:
        try:
            if p.partition not in ("time", "params", "uniform"):
                found = Plan.load(p.partition)
                found.check_matches(names, p.stages)
                found = ("given", found.to_dict())
            elif saved.is_file():
                old = Plan.load(saved)
                try:
                    old.check_matches(names, p.stages)
                    if old.method == p.partition:
                        found = ("reused", old.to_dict())
                except PartitionError as e:
                    log(f"pipeline: not reusing {saved} ({e}): partitioning again")
        except PartitionError as e:
            found = ("error", str(e))
    found = grid.world.bcast(found, root=0)
    if found and found[0] == "error":
        raise PartitionError(found[1])
    if found:
        plan = Plan.from_dict(found[1])
        log(f"pipeline: {found[0]} plan {p.partition if found[0] == 'given' else saved}")
        return plan
    rows = profile_blocks(blocks, task, sample_batch, device, repeats=p.profile_repeats, autocast=autocast)
    costs = combine(grid.world.allgather(rows))
    plan = partition(costs, p.stages, p.partition, memory_cap=p.stage_memory_gb * 2**30 or None,
                     bandwidth=p.bandwidth_gbs * 1e9 or None,
                     slots=activation_slots(p.schedule, p.stages, p.micro_batches))
    if grid.world.Get_rank() == 0:
        plan.save(saved)
        log(f"pipeline: {p.partition} plan saved to {saved}")
    return plan


def describe(plan: Plan) -> str:
    parts = [f"stage {s}: {plan.layer_names[a]}..{plan.layer_names[b - 1]} ({b - a} blocks, "
             f"{plan.stage_times[s] * 1e3:.1f} ms)" for s, (a, b) in enumerate(plan.stages)]
    return f"pipeline plan ({plan.method}, bottleneck/lower bound {plan.balance:.3f}): " + "; ".join(parts)


def _tied(blocks, plan: Plan) -> dict[tuple[int, ...], list[list[nn.Parameter]]]:
    """Parameters held by more than one stage, grouped by the set of stages holding them."""
    owners: dict[int, set[int]] = {}
    params: dict[int, nn.Parameter] = {}
    for s, (a, b) in enumerate(plan.stages):
        for _, block in blocks[a:b]:
            for p in block.parameters():
                owners.setdefault(id(p), set()).add(s)
                params[id(p)] = p
    groups: dict[tuple[int, ...], list[nn.Parameter]] = {}
    for key, stages in owners.items():
        if len(stages) > 1:
            groups.setdefault(tuple(sorted(stages)), []).append(params[key])
    return groups


class PipelineTrainer(Trainer):
    def __init__(self, model: nn.Module, train_loader, val_loader, runtime, cfg, task=None):
        task = task or Classification(cfg.optim.label_smoothing)
        self.grid = grid = runtime.backend.grid
        self.cfg = cfg
        blocks = task.blocks(model)
        autocast = self._autocast_for(cfg, runtime.device)
        sample = to_device(next(iter(train_loader)), runtime.device)
        log = print if runtime.cluster.rank == 0 else (lambda *_: None)
        model.to(runtime.device)  # profiled where it will run; blocks of other stages go back to the CPU below
        with watchdog.phase("pipeline profiling"):
            self.plan = make_plan(blocks, task, sample, grid, cfg, runtime.device, autocast, log)
        a, b = self.plan.stages[grid.stage]
        if runtime.device.type != "cpu":
            model.cpu()
        mine = [block for _, block in blocks[a:b]]
        stage_module = nn.ModuleList(mine)
        tied = {stages: ps if grid.stage in stages else [] for stages, ps in _tied(blocks, self.plan).items()}
        super().__init__(stage_module, build_optimizer(stage_module, cfg.optim), train_loader, val_loader,
                         runtime, cfg, task)
        self.stage = PipelineStage(mine, grid, task, runtime.device, cfg.pipeline.schedule, cfg.pipeline.micro_batches,
                                   tied=tied, reducer=cfg.pipeline.allreduce, autocast=self._autocast)
        self.stage_module, self.model = stage_module, model  # self.model: the whole model (unwrap, save_hf)
        self.counts_samples = grid.is_last
        sd = model.state_dict(keep_vars=True)
        ids = {id(t) for block in mine for t in (*block.parameters(), *block.buffers())}
        self.owned_keys = [k for k, v in sd.items() if id(v) in ids]
        self.log(describe(self.plan))

    @staticmethod
    def _autocast_for(cfg, device):
        dtype = {"bf16": torch.bfloat16}.get(cfg.dist.amp)
        return (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype else None

    def micro_batches_per_step(self) -> int:
        return self.cfg.pipeline.micro_batches

    # ---- step / evaluation -----------------------------------------------------------------------
    def train_step(self, micro_batches) -> torch.Tensor:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step)
        self.stage.zero_grad()
        stats = self.stage.step([to_device(b, self.device) for b in micro_batches])
        self.optimizer.step()
        self.step += 1
        return stats

    def eval_batch(self, batch) -> torch.Tensor:
        return self.stage.forward_only(batch)

    def sync_buffers(self) -> None:
        """BatchNorm running statistics averaged over the replicas of this stage."""
        if self.grid.replicas == 1:
            return
        for buf in self.stage_module.buffers():
            if buf.is_floating_point():
                host = buf.detach().cpu().clone()
                self.grid.data.Allreduce(MPI.IN_PLACE, as_buffer(host), op=MPI.SUM)
                buf.copy_(host / self.grid.replicas)

    # ---- state -----------------------------------------------------------------------------------
    def _gather(self) -> dict | None:
        """Stage leaders (replica 0) send their weights and optimizer state to rank 0, which returns the
        whole state (and loads the weights into its full model); the others return None."""
        part = None
        if self.grid.replica == 0:
            sd = self.model.state_dict()
            part = {"model": {k: sd[k].detach().cpu() for k in self.owned_keys},
                    "optimizer": self.optimizer.state_dict()}
        parts = self.grid.world.gather(part, root=0)
        if parts is None:
            return None
        parts = [q for q in parts if q is not None]  # in stage order: world rank = stage x replicas
        full = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for q in parts:
            full.update(q["model"])
        self.model.load_state_dict(full)
        return {"model": full, "optimizer": None, "scaler": None, "step": self.step, "world_size": self.cluster.size,
                "config": self.cfg.to_dict(),
                "pipeline": {"plan": self.plan.to_dict(), "optimizers": [q["optimizer"] for q in parts]}}

    def save(self) -> None:
        with watchdog.phase("checkpoint"):
            self.sync_buffers()
            self.write_checkpoint(self._gather())  # gather: collective; rank 0 writes, every rank learns the outcome

    def _resume(self) -> int:
        mode, state, where = self.cfg.run.resume, None, None
        if self.cluster.rank == 0:
            self.remove_stale_temps()
        if mode != "never" and self.cluster.rank == 0:
            read = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
            found = self.checkpoints.load_latest(read) if mode == "auto" else (Path(mode), self.checkpoints.load(
                Path(mode), read))
            if found:
                where, state = found
        state = self.grid.world.bcast(state, root=0)  # every stage needs its part of rank 0's checkpoint
        if state is None:
            for t in (*self.stage_module.parameters(), *self.stage_module.buffers()):  # replicas start equal
                host = t.detach().cpu().clone()
                self.grid.data.Bcast(as_buffer(host), root=0)
                t.data.copy_(host)
            return self.step
        self.model.load_state_dict(state["model"])
        pipe = state.get("pipeline")
        if pipe is None:
            self.log("note: checkpoint from a run without pipeline: weights loaded, optimizer state starts fresh")
        elif [tuple(r) for r in pipe["plan"]["stages"]] != [tuple(r) for r in self.plan.stages]:
            raise CheckpointError(f"checkpoint {where or mode} was written with stages {pipe['plan']['stages']}, "
                                  f"this run's plan has {self.plan.stages}: pass its plan with --partition "
                                  f"{Path(self.cfg.run.run_dir) / PLAN_FILE}")
        else:
            self.optimizer.load_state_dict(pipe["optimizers"][self.grid.stage])
        self.step = int(state["step"])
        self.log(f"resumed from {where} at step {self.step}")
        return self.step
