"""From parsed flags to a resumed trainer, the same sequence for every engine and recipe. Framework-neutral:
the engine module of --framework (hpctrain.engine.load) supplies `setup(cfg, cluster) -> Runtime` and
`make_trainer(recipe, cfg, rt, data, train_sampler, val_sampler, job) -> Trainer`."""
from __future__ import annotations

from hpctrain import engine as engines
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.runtime import Runtime, open_run_dir
from hpctrain.engine.trainer import Job, TrainerBase
from hpctrain.sync import Policy


def build_trainer(recipe, cfg, cluster) -> TrainerBase:
    """setup -> run directory (lock + rules) -> the recipe's data and this rank's samplers -> the engine's
    trainer -> the start line -> resume."""
    framework = cfg.dist.framework
    engine = engines.load(framework)
    rt = engine.setup(cfg, cluster)
    open_run_dir(recipe, cfg, rt)
    data, train_sampler, val_sampler = open_data(recipe, cfg, rt)
    job = Job(data=data, identity=recipe.identity(cfg, data), after_train=getattr(recipe, f"{framework}_after", None))
    trainer = engine.make_trainer(recipe, cfg, rt, data, train_sampler, val_sampler, job)
    announce(trainer, recipe, cfg)
    trainer.resume()
    return trainer


def open_data(recipe, cfg, rt: Runtime):
    """The recipe's data and this rank's samplers over it: (data, train_sampler, val_sampler or None)."""
    from hpctrain.recipes.base import World
    log = print if rt.cluster.rank == 0 else (lambda *_: None)
    data = recipe.data(cfg, World(rt.cluster.rank, rt.data_rank, rt.data_size, rt.backend.broadcast_object, log))
    d, seed = cfg.data, cfg.run.seed
    train = ShardedBatchSampler(len(data.train), rt.data_rank, rt.data_size, d.batch_size * rt.local_replicas, seed,
                                contiguous=data.contiguous)
    val = None
    if data.val is not None:
        val = ShardedBatchSampler(len(data.val), rt.data_rank, rt.data_size, d.eval_batch_size or d.batch_size, seed,
                                  shuffle=False, drop_last=False, pad=False)
    return data, train, val


def announce(trainer: TrainerBase, recipe, cfg) -> None:
    rt, per, policy = trainer.rt, cfg.data.batch_size, Policy.of(cfg)
    sync = "" if policy.default else f" ({policy.describe()})"
    trainer.log(f"{recipe.prog}: {recipe.describe(cfg, trainer.data, trainer.parameter_count())}, {rt.backend.name} "
                f"backend{sync}, device {rt.device}, {rt.threads} thread(s) per rank, {trainer.steps_per_epoch} "
                f"steps/epoch, "
                f"batch {per} per replica x {trainer.data_size} replica(s) x {trainer.micro_batches} micro-batch(es) "
                f"= {per * trainer.data_size * trainer.micro_batches} global; {trainer.bound}")
