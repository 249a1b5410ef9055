"""ResNet image classification: `python -m hpctrain.resnet [--config FILE] [flags]` under any launcher."""
from __future__ import annotations

import sys

from hpctrain import cli
from hpctrain.data.images import build_image_sources
from hpctrain.data.sharding import ShardedBatchSampler

PROG = "hpctrain.resnet"


def build(cfg, cluster):
    from hpctrain.engine.torch import make_loader, make_trainer, setup  # torch loads after arg checks
    from hpctrain.models.resnet import build_resnet
    rt = setup(cfg, cluster)
    d = cfg.data
    train_src, val_src = build_image_sources(d.dataset, d.path or None, d.image_size, d.num_classes,
                                             cfg.run.seed, d.synthetic_size, d.verify,
                                             log=print if cluster.rank == 0 else (lambda *_: None))
    train_sampler = ShardedBatchSampler(len(train_src), rt.data_rank, rt.data_size, d.batch_size, cfg.run.seed)
    val_sampler = ShardedBatchSampler(len(val_src), rt.data_rank, rt.data_size, d.eval_batch_size or d.batch_size,
                                      cfg.run.seed, shuffle=False, drop_last=False, pad=False)
    model = build_resnet(cfg.model.arch, train_src.num_classes, cfg.model.zero_init_residual)
    trainer = make_trainer(model, make_loader(train_src, train_sampler, d.workers, rt.device),
                           make_loader(val_src, val_sampler, d.workers, rt.device), rt, cfg)
    trainer.log(f"{PROG}: {cfg.model.arch}, {rt.backend.name} backend, device {rt.device}, "
                f"{rt.threads} thread(s) per rank, {trainer.steps_per_epoch} steps/epoch")
    trainer.resume()
    return trainer


def main(argv: list[str] | None = None) -> int:
    return cli.run(PROG, argv, build)


if __name__ == "__main__":
    sys.exit(main())
