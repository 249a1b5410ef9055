"""The pipeline step plan: the model is split into stages by a partition plan; each rank trains its
stage of one data-parallel replica. The Trainer (engine/torch/trainer.py) drives it exactly like the
data-parallel plan: the step, evaluation and state handling move through the stage grid.

Every rank builds the full model on the CPU (same seed: same initial weights) and moves only its
stage's blocks to the device. Checkpoints hold the whole model under the usual "model" key (stage
leaders send their parts to rank 0), so a pipelined run's checkpoint also loads without a pipeline."""
from __future__ import annotations

from pathlib import Path

import torch
from mpi4py import MPI
from torch import nn

from hpctrain import watchdog
from hpctrain.engine.torch.pipeline.profile import combine, profile_blocks
from hpctrain.engine.torch.pipeline.runtime import PipelineStage, as_buffer
from hpctrain.engine.torch.util import build_optimizer, to_device
from hpctrain.pipeline.partition import PartitionError, Plan, partition
from hpctrain.pipeline.schedule import activation_slots
from hpctrain.pipeline.transfer import gather_to_root, scatter_from_root

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


def tied_parameters(blocks, plan: Plan) -> dict[tuple[int, ...], list[list[nn.Parameter]]]:
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


class PipelinePlan:
    """This rank's stage of the model, its optimizer and the PipelineStage that runs the schedule."""

    def __init__(self, model: nn.Module, train_loader, runtime, cfg, task, autocast):
        self.grid = grid = runtime.backend.grid
        self.cfg, self.cluster = cfg, runtime.cluster
        self.micro_batches = cfg.pipeline.micro_batches
        self.counts_samples = grid.is_last  # a replica's samples are counted once, by its last stage
        self.blocks = blocks = task.blocks(model)
        sample = to_device(next(iter(train_loader)), runtime.device)
        log = print if runtime.cluster.rank == 0 else (lambda *_: None)
        stage_autocast = autocast if cfg.dist.amp == "bf16" else None
        model.to(runtime.device)  # profiled where it will run; blocks of other stages go back to the CPU below
        with watchdog.phase("pipeline profiling"):
            self.plan = make_plan(blocks, task, sample, grid, cfg, runtime.device, stage_autocast, log)
        a, b = self.plan.stages[grid.stage]
        if runtime.device.type != "cpu":
            model.cpu()
        mine = [block for _, block in blocks[a:b]]
        self.model = nn.ModuleList(mine).to(runtime.device)  # this rank's stage
        self.full = model  # every stage's blocks; rank 0 fills it with the whole state at each save
        self.optimizer = build_optimizer(self.model, cfg.optim)
        tied = {stages: ps if grid.stage in stages else [] for stages, ps in tied_parameters(blocks, self.plan).items()}
        self.stage = PipelineStage(mine, grid, task, runtime.device, cfg.pipeline.schedule, cfg.pipeline.micro_batches,
                                   tied=tied, reducer=cfg.pipeline.allreduce, autocast=autocast)
        self.owned_keys = [self.keys_of(s) for s in range(len(self.plan.stages))]
        self.parts: list[dict] | None = None  # rank 0, between load_state and broadcast_state
        log(describe(self.plan))

    def keys_of(self, stage: int) -> list[str]:
        """State-dict keys of the parameters and buffers a stage holds (tied ones in both stages)."""
        a, b = self.plan.stages[stage]
        ids = {id(t) for _, block in self.blocks[a:b] for t in (*block.parameters(), *block.buffers())}
        return [k for k, v in self.full.state_dict(keep_vars=True).items() if id(v) in ids]

    def whole_model(self) -> nn.Module:
        return self.full

    # ---- step / evaluation -----------------------------------------------------------------------
    def run(self, micro_batches, trainer) -> torch.Tensor:
        self.stage.zero_grad()
        stats = self.stage.step([to_device(b, trainer.device) for b in micro_batches])
        self.optimizer.step()
        return stats

    def eval_batch(self, batch, trainer) -> torch.Tensor:
        return self.stage.forward_only(batch)

    def sync_buffers(self) -> None:
        """BatchNorm running statistics averaged over the replicas of this stage."""
        if self.grid.replicas == 1:
            return
        for buf in self.model.buffers():
            if buf.is_floating_point():
                host = buf.detach().cpu().clone()
                self.grid.data.Allreduce(MPI.IN_PLACE, as_buffer(host), op=MPI.SUM)
                buf.copy_(host / self.grid.replicas)

    # ---- state -----------------------------------------------------------------------------------
    def state(self, trainer) -> dict | None:
        """A collective: stage leaders (replica 0) send their weights and optimizer state to rank 0
        (mpi4py pkl5: a stage's state may pass 2 GiB), which returns the whole checkpoint (and loads
        the weights into its full model, for exports); the others return None."""
        part = None
        if self.grid.replica == 0:
            sd = self.full.state_dict()
            part = {"model": {k: sd[k].detach().cpu() for k in self.owned_keys[self.grid.stage]},
                    "optimizer": self.optimizer.state_dict()}
        parts = gather_to_root(self.grid.world, part)
        if parts is None:
            return None
        parts = [q for q in parts if q is not None]  # in stage order: world rank = stage x replicas
        full = {k: v.detach().cpu() for k, v in self.full.state_dict().items()}
        for q in parts:
            full.update(q["model"])
        self.full.load_state_dict(full)
        return {"model": full, "optimizer": None, "scaler": None, **trainer.checkpoint_meta(),
                "pipeline": {"plan": self.plan.to_dict(), "optimizers": [q["optimizer"] for q in parts]}}

    def layout_mismatch(self, state: dict) -> str | None:
        """A pipelined checkpoint loads only into the same stages (its optimizer state is per stage)."""
        pipe = state.get("pipeline")
        if pipe is not None and [tuple(r) for r in pipe["plan"]["stages"]] != [tuple(r) for r in self.plan.stages]:
            return (f"it was written with stages {pipe['plan']['stages']}, this run's plan has {self.plan.stages}: "
                    f"pass its plan with --partition {Path(self.cfg.run.run_dir) / PLAN_FILE}")
        return None

    def load_state(self, state: dict, trainer) -> None:
        """Rank 0 cuts the checkpoint into one part per world rank: its stage's weights and optimizer state."""
        pipe = state.get("pipeline")
        if pipe is None:
            trainer.log("note: checkpoint from a run without pipeline: weights loaded, optimizer state starts fresh")
        self.full.load_state_dict(state["model"])
        parts = [{"model": {k: state["model"][k] for k in self.owned_keys[s]},
                  "optimizer": pipe["optimizers"][s] if pipe is not None else None}
                 for s in range(len(self.plan.stages))]
        self.parts = [parts[r // self.grid.replicas] for r in range(self.grid.world.Get_size())]

    def broadcast_state(self, trainer) -> None:
        """Each rank gets only its own stage's part (a scatter, not a broadcast of the whole model); with nothing
        loaded, the replicas of a stage start from their replica 0's initial weights."""
        parts = self.parts
        if self.grid.world.Get_rank() == 0 and parts is None:
            parts = [None] * self.grid.world.Get_size()
        item = scatter_from_root(self.grid.world, parts)
        self.parts = None
        if item is None:
            for t in (*self.model.parameters(), *self.model.buffers()):
                host = t.detach().cpu().clone()
                self.grid.data.Bcast(as_buffer(host), root=0)
                t.data.copy_(host)
            return
        self.full.load_state_dict(item["model"], strict=False)
        if item["optimizer"] is not None:
            self.optimizer.load_state_dict(item["optimizer"])
