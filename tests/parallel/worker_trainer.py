"""Run under a launcher. hpctrain's gradient path (sampler -> loader -> Trainer.train_step -> backend)
must give the same parameters as one process doing full-batch SGD, on every rank.

    mpirun -np 2 python tests/parallel/worker_trainer.py --backend horovod [--accumulate 2] [--fp16-allreduce]
Prints one line `OK <rank> <json>` per rank; any mismatch raises (non-zero exit).
"""
import argparse
import copy
import json
import sys
import tempfile

import torch
from torch import nn

from hpctrain.cluster import detect
from hpctrain.config import TrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.torch import Trainer, build_optimizer, make_loader, setup
from hpctrain.models.resnet import build_resnet
from tests.parallel.table import Table


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="horovod")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--fp16-allreduce", action="store_true")
    p.add_argument("--adasum", action="store_true")
    p.add_argument("--model", default="mlp", choices=["mlp", "resnet18"])
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    cluster = detect()
    r, n = cluster.rank, cluster.size
    cfg = TrainConfig()
    cfg.run.run_dir = tempfile.mkdtemp()
    cfg.dist.backend, cfg.dist.accumulate = a.backend, a.accumulate
    cfg.dist.fp16_allreduce, cfg.dist.adasum = a.fp16_allreduce, a.adasum
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.1, 0.9, 0.0
    cfg.optim.warmup_epochs, cfg.optim.schedule, cfg.optim.lr_scaling = 0, "constant", "none"
    cfg.data.batch_size = 4
    rt = setup(cfg, cluster)

    g = torch.Generator().manual_seed(0)
    if a.model == "mlp":
        x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
        torch.manual_seed(1000 + r)  # different init per rank: broadcast must fix it
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    else:
        x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)
        torch.manual_seed(1000 + r)
        model = build_resnet("resnet18", 10)
    sampler = ShardedBatchSampler(len(x), r, n, cfg.data.batch_size, seed=7)
    trainer = Trainer(model, build_optimizer(model, cfg.optim), make_loader(Table(x, y), sampler, 0, rt.device),
                      None, rt, cfg)
    # fp16 loss scaling needs a GPU, but its state travels like any other: give each rank a different
    # scale (a CPU GradScaler); resume must leave every rank with rank 0's.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (4 + r))
    trainer.resume()  # resume="auto" finds nothing in a fresh dir: broadcasts rank 0's initial state
    loss_scale, trainer.scaler = trainer.scaler.get_scale(), None

    ref = copy.deepcopy(rt.backend.unwrap(trainer.model))
    ref_opt = build_optimizer(ref, cfg.optim)
    others = [ShardedBatchSampler(len(x), q, n, cfg.data.batch_size, seed=7) for q in range(n)]
    batches, ref_batches = iter(trainer.train_loader), [iter(s) for s in others]
    for _ in range(a.steps):
        trainer.train_step([next(batches) for _ in range(a.accumulate)])
        # Reference: one process, the union of every rank's micro-batches, mean loss, one step.
        idx = [i for it in ref_batches for _ in range(a.accumulate) for i, _ in next(it)]
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        ref_opt.step()

    mine = torch.cat([p.detach().flatten() for p in rt.backend.unwrap(trainer.model).parameters()])
    mean = rt.backend.allreduce(mine.clone(), "mean")
    spread = (mine - mean).abs().max().item()
    assert spread == 0.0, f"rank {r}: parameters differ across ranks by {spread}"
    out = {"rank": r, "size": n, "launcher": cluster.launcher, "backend": rt.backend.name, "spread": spread,
           "loss_scale": loss_scale}
    if a.model == "mlp" and not a.adasum:
        want = torch.cat([p.detach().flatten() for p in ref.parameters()])
        diff = (mine - want).abs().max().item()
        tol = 2e-3 if a.fp16_allreduce else 1e-5
        assert diff < tol, f"rank {r}: differs from the single-process full-batch result by {diff} (tol {tol})"
        out["diff_vs_single_process"] = diff
    sys.stdout.write(f"OK {r} {json.dumps(out)}\n")  # one write: lines of two ranks must not interleave
    sys.stdout.flush()
    trainer.close()


if __name__ == "__main__":
    main()
