"""The PyTorch engine: `build_trainer(recipe, cfg, cluster)` -> a resumed Trainer for hpctrain.loop.

    runtime.py        setup: device by local rank, threads, seed, backend, run-dir lock
    backends/         how gradients are combined (horovod, ddp, mpi, none; the pipeline's mpi4py grid)
    trainer.py        Trainer: the loop's engine protocol over a step plan
    data_parallel.py  the data-parallel step plan;  pipeline/step.py: the pipeline one
    tasks.py, util.py Classification; loaders, optimizer, batches to the device
"""
from __future__ import annotations

from hpctrain.data.sharding import ShardedBatchSampler
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
    """setup -> the recipe's data -> sharded samplers and loaders -> its torch model and task -> Trainer
    -> resume. The same sequence for every recipe."""
    from hpctrain.recipes.base import World
    rt = setup(cfg, cluster)
    log = print if cluster.rank == 0 else (lambda *_: None)
    data = recipe.data(cfg, World(cluster.rank, rt.data_rank, rt.data_size, rt.backend.broadcast_object, log))
    d, seed = cfg.data, cfg.run.seed
    train_sampler = ShardedBatchSampler(len(data.train), rt.data_rank, rt.data_size, d.batch_size, seed,
                                        contiguous=data.contiguous)
    val_loader = None
    if data.val is not None:
        val_sampler = ShardedBatchSampler(len(data.val), rt.data_rank, rt.data_size, d.eval_batch_size or d.batch_size,
                                          seed, shuffle=False, drop_last=False, pad=False)
        val_loader = make_loader(data.val, val_sampler, d.workers, rt.device)
    model = recipe.torch_model(cfg, data)
    trainer = make_trainer(model, make_loader(data.train, train_sampler, d.workers, rt.device), val_loader, rt, cfg,
                           recipe.torch_task(cfg))
    trainer.data = data
    trainer.after_train = getattr(recipe, "torch_after", None)
    params = sum(p.numel() for p in model.parameters())
    trainer.log(f"{recipe.prog}: {recipe.describe(cfg, data, params)}, {rt.backend.name} backend, device {rt.device}, "
                f"{rt.threads} thread(s) per rank, {trainer.steps_per_epoch} steps/epoch")
    trainer.resume()
    return trainer
