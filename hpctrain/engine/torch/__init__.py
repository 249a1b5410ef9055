"""The PyTorch engine: `build_trainer(recipe, cfg, cluster)` -> a resumed Trainer for hpctrain.loop.

    runtime.py        setup: device by local rank, threads, seed, backend, run-dir lock
    backends/         how gradients are combined (horovod, ddp, mpi, none; the pipeline's mpi4py grid)
    trainer.py        Trainer: the loop's engine protocol over a step plan
    data_parallel.py  the data-parallel step plan;  pipeline/step.py: the pipeline one
    tasks.py, util.py Classification; loaders, optimizer, batches to the device
"""
from __future__ import annotations

from hpctrain.engine.base import announce, open_data, open_run_dir
from hpctrain.engine.torch.runtime import Runtime, setup
from hpctrain.engine.torch.tasks import Classification
from hpctrain.engine.torch.trainer import Trainer
from hpctrain.engine.torch.util import autocast_factory, build_optimizer, make_loader, to_device

__all__ = ["Classification", "Runtime", "Trainer", "build_optimizer", "build_trainer", "make_loader",
           "make_trainer", "setup", "to_device"]


def make_trainer(model, train_loader, val_loader, rt: Runtime, cfg, task=None) -> Trainer:
    """Data parallel (the backend wraps the whole model), or pipeline x data parallel when
    --pipeline-stages > 1 (the model is split into stages; each rank optimizes its stage only)."""
    task = task or Classification(cfg.optim.label_smoothing)
    if cfg.pipeline.stages == 1:
        return Trainer(model, build_optimizer(model, cfg.optim), train_loader, val_loader, rt, cfg, task)
    from hpctrain.engine.torch.pipeline.step import PipelinePlan  # imports mpi4py: only for pipeline runs
    plan = PipelinePlan(model, train_loader, rt, cfg, task, autocast_factory(cfg.dist.amp, rt.device))
    return Trainer(None, None, train_loader, val_loader, rt, cfg, task, plan=plan)


def build_trainer(recipe, cfg, cluster) -> Trainer:
    """setup -> the run directory -> the recipe's data -> sharded samplers and loaders -> its torch model and
    task -> Trainer -> resume. The same sequence for every recipe (and the TF engine's)."""
    rt = setup(cfg, cluster)
    open_run_dir(recipe, cfg, rt)
    data, train_sampler, val_sampler = open_data(recipe, cfg, rt)
    workers = cfg.data.workers
    val_loader = make_loader(data.val, val_sampler, workers, rt.device) if val_sampler is not None else None
    model = recipe.torch_model(cfg, data)
    trainer = make_trainer(model, make_loader(data.train, train_sampler, workers, rt.device), val_loader, rt, cfg,
                           recipe.torch_task(cfg))
    trainer.data = data
    trainer.after_train = getattr(recipe, "torch_after", None)
    trainer.identity = recipe.identity(cfg, data)
    announce(trainer, recipe, cfg, data, sum(p.numel() for p in model.parameters()))
    trainer.resume()
    return trainer
