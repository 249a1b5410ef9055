"""The PyTorch engine: `setup(cfg, cluster)` and `make_trainer(...)` for hpctrain.engine.build.

    runtime.py        setup: device by local rank, threads, seed, backend
    backends/         how bytes move (horovod, ddp, mpi, none; the pipeline's mpi4py grid), counted
    sync/             what crosses the network and when: allreduce, local SGD, PowerSGD, ZeRO-1 (hpctrain.sync)
    trainer.py        Trainer: the engine contract (hpctrain.engine.trainer) over a step plan
    data_parallel.py  the data-parallel step plan;  pipeline/step.py: the pipeline one
    tasks.py, util.py Classification; loaders, optimizer, batches to the device
"""
from __future__ import annotations

from hpctrain.engine.runtime import Runtime
from hpctrain.engine.torch.runtime import setup
from hpctrain.engine.torch.trainer import Trainer
from hpctrain.engine.torch.util import autocast_factory, build_optimizer, make_loader, to_device
from hpctrain.engine.trainer import Job
from hpctrain.models.tasks import Classification

__all__ = ["Classification", "Runtime", "Trainer", "build_optimizer", "make_loader", "make_trainer", "setup",
           "to_device"]


def make_trainer(recipe, cfg, rt: Runtime, data, train_sampler, val_sampler, job: Job) -> Trainer:
    """Loaders over the samplers, the recipe's torch model and task; data parallel (the backend wraps the whole
    model), or pipeline x data parallel when --pipeline-stages > 1 (each rank optimizes its stage only)."""
    workers = cfg.data.workers
    train_loader = make_loader(data.train, train_sampler, workers, rt.device)
    val_loader = make_loader(data.val, val_sampler, workers, rt.device) if val_sampler is not None else None
    model, task = recipe.torch_model(cfg, data), recipe.torch_task(cfg)
    if cfg.pipeline.stages == 1:
        return Trainer(model, build_optimizer(model, cfg.optim), train_loader, val_loader, rt, cfg, task, job=job)
    from hpctrain.engine.torch.pipeline.step import PipelinePlan  # imports mpi4py: only for pipeline runs
    plan = PipelinePlan(model, train_loader, rt, cfg, task, autocast_factory(cfg.dist.amp, rt.device))
    return Trainer(None, None, train_loader, val_loader, rt, cfg, task, plan=plan, job=job)
