"""Run under mpirun -np 2. The synchronization strategies of the torch engine (engine/torch/sync) against their
reference cases, on the horovod, mpi and ddp backends at once (one backend of each kind per process), through the
real Trainer path (Trainer.train_step -> DataParallel -> strategy -> backend), in float64 (model and loss):

    local SGD K=1, plain SGD            == allreduce SGD; K=4 (+ warm-up): ranks differ between averages, identical
                                           right after each; a resume across an average is exact
    PowerSGD (horovod, mpi)             == torch's powerSGD_hook on ddp; rank >= the smallest matrix side == allreduce;
                                           the error feedback survives a resume (and matters)
    ZeRO-1 (SGD momentum, AdamW)        == the unsharded optimizer step for step; ~1/N of its state per rank; the
                                           consolidated state == the unsharded optimizer's; a ZeRO checkpoint resumes
                                           without ZeRO and the other way round
    bytes handed to the collectives     per step, as each strategy should send

    gossip (ring, exponential)          == local SGD K=1 on 2 ranks; one model per step; a resume is exact. On 4 ranks
                                           (--only gossip): the mean kept, the spread shrinking (exact average after
                                           log2(size) exponential-graph steps)

    mpirun -np 2 python tests/parallel/worker_sync.py [--only local_sgd,powersgd,zero,gossip,traffic]
Prints one line `OK <rank> <json>` per rank (the measured differences); any check that fails raises.
"""
import argparse
import copy
import json
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain.cluster import detect
from hpctrain.config import TrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.torch import Trainer, build_optimizer, make_loader, setup
from hpctrain.engine.torch.sync.zero import state_bytes
from hpctrain.sync import Schedule
from tests.parallel.table import Table

BACKENDS = ("horovod", "mpi", "ddp")
B = 4  # samples per rank per step
EXACT = 1e-12  # float64: what "equal" allows for sums taken in another order


class Exact:
    """Cross-entropy in float64 (the default task computes its loss in float32)."""

    def __call__(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        n = torch.tensor(float(y.numel()), dtype=torch.float64)
        return loss, torch.stack([loss.detach() * n, (logits.argmax(1) == y).sum().double(), n])


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def bn_net():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()


class Job:
    def __init__(self):
        self.cluster = detect()
        self.rank, self.size = self.cluster.rank, self.cluster.size
        self.runtimes = {}
        for b in BACKENDS:
            cfg = self.config(b)
            self.runtimes[b] = setup(cfg, self.cluster)  # one backend of each kind, shared by the trainers below

    def config(self, backend, strategy="allreduce", optimizer="sgd", momentum=0.0, weight_decay=0.0, zero=False,
               accumulate=1, **sync):
        cfg = TrainConfig()
        cfg.run.run_dir = tempfile.mkdtemp()
        cfg.dist.backend, cfg.sync.strategy, cfg.sync.zero, cfg.dist.accumulate = backend, strategy, zero, accumulate
        for k, v in sync.items():
            setattr(cfg.sync, k, v)
        o = cfg.optim
        o.optimizer, o.lr, o.momentum, o.weight_decay = optimizer, 0.05 if optimizer == "sgd" else 0.01, momentum, \
            weight_decay
        o.warmup_epochs, o.schedule, o.lr_scaling = 0, "constant", "none"
        cfg.data.batch_size = B
        return cfg

    def trainer(self, backend, net=mlp, **options) -> Trainer:
        cfg = self.config(backend, **options)
        # One backend per kind serves every trainer here (Horovod starts once); it reads the dist options (e.g.
        # accumulate: Horovod's backward_passes_per_step) when it wraps, as one job's trainer would give them.
        self.runtimes[backend].backend.cfg = cfg.dist
        torch.manual_seed(1000 + self.rank)  # a different init per rank: rank 0's must reach every rank
        model = net()
        x, y = torch.zeros(64, 8, dtype=torch.float64), torch.zeros(64, dtype=torch.long)
        loader = make_loader(Table(x, y), ShardedBatchSampler(64, self.rank, self.size, B, seed=7), 0,
                             torch.device("cpu"))
        t = Trainer(model, build_optimizer(model, cfg.optim), loader, None, self.runtimes[backend], cfg, Exact())
        t.restore(None)  # rank 0's initial weights to every rank
        t.traffic.take()
        return t

    def batch(self, step):
        """This rank's samples of step `step` (the same global batch whatever the backend or strategy)."""
        g = torch.Generator().manual_seed(step)
        x = torch.randn(B * self.size, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (B * self.size,), generator=g)
        return x[self.rank * B:(self.rank + 1) * B], y[self.rank * B:(self.rank + 1) * B]

    def train(self, t, steps):
        """`steps` steps of `t.micro_batches` micro-batches each."""
        for _ in range(steps):
            t.train_step([self.batch(t.step + 1000 * i) for i in range(t.micro_batches)])

    def spread(self, t, buffers=True) -> float:
        """How far this rank's weights (and floating buffers) are from the mean over ranks."""
        mine = flat(t, buffers)
        return (mine - t.backend.allreduce(mine.clone(), "mean")).abs().max().item()

    def checkpoint(self, t) -> dict | None:
        """What a save writes (rank 0; None elsewhere): the ranks settled, then the state; both collectives."""
        t.sync_buffers()
        return copy.deepcopy(t.state())

    def resumed(self, backend, state, **options) -> Trainer:
        t = self.trainer(backend, **options)
        t.step = t.restore(("memory", state) if self.rank == 0 else None)
        t.traffic.take()
        return t


def flat(t, buffers=True) -> torch.Tensor:
    m = t.whole_model()
    tensors = [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point() and buffers)]
    return torch.cat([v.detach().reshape(-1) for v in tensors])


def diff(a, b) -> float:
    return (flat(a) - flat(b)).abs().max().item()


def check(ok, message):
    if not ok:
        raise AssertionError(message)


# ---- local SGD --------------------------------------------------------------------------------------------
def local_sgd(job: Job) -> dict:
    out = {}
    for b in BACKENDS:
        plain, local = job.trainer(b), job.trainer(b, strategy="local-sgd", period=1, warmup=0)
        job.train(plain, 6)
        job.train(local, 6)
        d = diff(plain, local)
        check(d < EXACT, f"{b}: local SGD K=1 differs from allreduce SGD by {d}")
        out[f"k1_vs_allreduce_{b}"] = d
        out.update({f"k4_{k}_{b}": v for k, v in local_sgd_k4(job, b).items()})
    return out


def local_sgd_k4(job: Job, b: str) -> dict:
    """K=4 after 2 warm-up steps, SGD with momentum, BatchNorm: spread per step; bytes per step; a resume at step 5
    (between averages at steps 2 and 6) equals the run that saved there and went on."""
    options = dict(strategy="local-sgd", period=4, warmup=2, momentum=0.9, net=bn_net)
    schedule, t, sent = Schedule(4, 2), job.trainer(b, **options), []
    params = sum(p.numel() for p in t.whole_model().parameters()) * 8
    buffers = sum(x.numel() for x in t.whole_model().buffers() if x.is_floating_point()) * 8
    state = None
    for step in range(12):
        job.train(t, 1)
        sent.append(t.traffic.take()[0])
        weights = job.spread(t, buffers=False)
        if schedule.averages_after(step):
            check(job.spread(t) == 0.0, f"{b}: ranks differ right after the average of step {step}")
            check(sent[-1] == params + buffers, f"{b}: an average sent {sent[-1]} bytes, not {params + buffers}")
        elif schedule.allreduces_gradients(step):
            check(weights == 0.0 and sent[-1] == params, f"{b}: warm-up step {step}: spread {weights}, {sent[-1]} B")
        else:
            check(weights > 1e-6 and sent[-1] == 0, f"{b}: local step {step}: spread {weights}, sent {sent[-1]} B")
        if step == 4:
            state = job.checkpoint(t)  # after 5 steps: between the averages after steps 2 and 6
            check(job.spread(t) == 0.0, f"{b}: a save did not settle the ranks")
            t.traffic.take()
    resumed = job.resumed(b, state, **options)
    job.train(resumed, 7)
    d = diff(t, resumed)
    check(d < EXACT, f"{b}: local SGD resumed at step 5 differs from the uninterrupted run by {d}")
    return {"resume_diff": d, "bytes_per_sync": params + buffers, "bytes_per_warmup_step": params}


# ---- PowerSGD ---------------------------------------------------------------------------------------------
POWER = dict(strategy="powersgd", powersgd_rank=2, powersgd_start=2, momentum=0.9)


def powersgd(job: Job) -> dict:
    out, runs = {}, {}
    for b in BACKENDS:
        runs[b] = job.trainer(b, **POWER)
        job.train(runs[b], 8)
    for b in ("horovod", "mpi"):
        d = diff(runs[b], runs["ddp"])
        check(d < 1e-10, f"PowerSGD on {b} differs from torch's hook on ddp by {d}")
        out[f"vs_torch_hook_{b}"] = d
    for b in BACKENDS:
        full, plain = job.trainer(b, **{**POWER, "powersgd_rank": 16}), job.trainer(b, momentum=0.9)
        compress_everything(full)
        job.train(full, 5)
        job.train(plain, 5)
        d = diff(full, plain)
        check(d < 1e-10, f"{b}: PowerSGD with rank >= every matrix side differs from allreduce by {d}")
        out[f"full_rank_vs_allreduce_{b}"] = d
    for b in ("mpi", "ddp", "horovod"):
        out.update({f"{k}_{b}": v for k, v in powersgd_resume(job, b).items()})
    return out


def compress_everything(t) -> None:
    """Compress every tensor, vectors too (torch's min_compression_rate 0): the low-rank path at full rank."""
    s = t.plan.sync
    if hasattr(s, "hook_state"):
        s.hook_state.min_compression_rate = 0
    else:
        s.core.min_rate = 0


def powersgd_resume(job: Job, b: str) -> dict:
    t = job.trainer(b, **POWER)
    job.train(t, 4)
    state = job.checkpoint(t)
    job.train(t, 4)
    resumed = job.resumed(b, state, **POWER)
    job.train(resumed, 4)
    d = diff(t, resumed)
    check(d < EXACT, f"{b}: PowerSGD resumed at step 4 differs from the uninterrupted run by {d}")
    if job.rank == 0:
        state["sync"] = None  # the same checkpoint without the strategy's state: error feedback and Q lost
    forgot = job.resumed(b, state, **POWER)
    job.train(forgot, 4)
    lost = diff(t, forgot)
    check(lost > 1e-8, f"{b}: dropping the error feedback changed nothing ({lost})")
    return {"resume_diff": d, "without_state_diff": lost}


# ---- ZeRO-1 -----------------------------------------------------------------------------------------------
def zero(job: Job) -> dict:
    out = {}
    for b in BACKENDS:
        for opt in ("sgd", "adamw"):
            options = dict(optimizer=opt, momentum=0.9, weight_decay=0.01)
            plain, sharded = job.trainer(b, **options), job.trainer(b, zero=True, **options)
            for step in range(5):
                job.train(plain, 1)
                job.train(sharded, 1)
                d = diff(plain, sharded)
                check(d < EXACT, f"{b} {opt}: ZeRO-1 differs from the unsharded optimizer by {d} at step {step}")
            ratio = state_bytes(sharded.optimizer) / state_bytes(plain.optimizer)
            check(0.3 < ratio < 0.7, f"{b} {opt}: rank {job.rank} holds {ratio:.2f} of the optimizer state")
            out[f"{opt}_diff_{b}"], out[f"{opt}_state_share_{b}"] = d, ratio
            out.update({f"{opt}_{k}_{b}": v for k, v in zero_checkpoints(job, b, plain, sharded, options).items()})
    return {**out, **zero_extras(job)}


def zero_extras(job: Job) -> dict:
    """ZeRO with gradient accumulation, and with a loss scaler whose step one rank's overflow must skip everywhere
    (the overflow lands in rank 0's share only: rank 1 learns it from the agreement)."""
    out = {}
    for b in ("horovod", "mpi"):
        options = dict(optimizer="adamw", weight_decay=0.01)
        plain, sharded = job.trainer(b, accumulate=2, **options), job.trainer(b, accumulate=2, zero=True, **options)
        job.train(plain, 3)
        job.train(sharded, 3)
        out[f"accumulate2_diff_{b}"] = d = diff(plain, sharded)
        check(d < EXACT, f"{b}: ZeRO with accumulation differs from the unsharded optimizer by {d}")
        plain, sharded = job.trainer(b, **options), job.trainer(b, zero=True, **options)
        for t in (plain, sharded):
            t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
            # At step 2 rank 1's first-layer weight gradient is not finite: the first elements of the flat buffer,
            # rank 0's share under ZeRO.
            t.whole_model()[0].weight.register_hook(lambda g, t=t: g * float("inf") if t.step == 2 and job.rank == 1
                                                     else g)
            job.train(t, 4)
        scales = (plain.scaler.get_scale(), sharded.scaler.get_scale())
        out[f"scaler_diff_{b}"] = d = diff(plain, sharded)
        check(d < EXACT and scales[0] == scales[1] == 2.0 ** 9, f"{b}: ZeRO with a loss scaler: {d}, scales {scales}")
    return out


def zero_checkpoints(job: Job, b: str, plain, sharded, options) -> dict:
    """The consolidated state == the unsharded optimizer's; each resumes the other, the same 3 steps on."""
    mine, theirs = job.checkpoint(sharded), job.checkpoint(plain)
    format_diff = 0.0
    if job.rank == 0:
        a, c = mine["optimizer"], theirs["optimizer"]
        check([g["params"] for g in a["param_groups"]] == [g["params"] for g in c["param_groups"]], "param groups")
        check(a["state"].keys() == c["state"].keys(), "state keys")
        for i in c["state"]:
            for k, v in c["state"][i].items():
                format_diff = max(format_diff, (a["state"][i][k].double() - v.double()).abs().max().item())
        check(format_diff < EXACT, f"{b}: the consolidated optimizer state differs from the unsharded one")
    without = job.resumed(b, mine, **options)  # a ZeRO checkpoint, resumed without ZeRO
    with_zero = job.resumed(b, theirs, zero=True, **options)  # an unsharded one, resumed with ZeRO
    inner = getattr(with_zero.optimizer, "local", None)  # ours (horovod, mpi): the trainer's LR must reach it
    check(inner is None or with_zero.optimizer.param_groups is inner.param_groups, f"{b}: stale param groups")
    for t in (plain, sharded, without, with_zero):
        job.train(t, 3)
    d = max(diff(plain, without), diff(plain, with_zero), diff(plain, sharded))
    check(d < EXACT, f"{b}: across ZeRO and unsharded checkpoints the runs differ by {d}")
    return {"format_diff": format_diff, "resume_diff": d}


# ---- gossip -----------------------------------------------------------------------------------------------
def gossip(job: Job) -> dict:
    """2 ranks: gossip (either graph) == local SGD K=1 step for step (SGD momentum, BatchNorm: the optimizer state
    stays local in both); one model's bytes per step; a resume between saves is exact. 4 ranks (mpi): the mixing
    alone, see `gossip_mixing`."""
    if job.size != 2:
        return gossip_mixing(job)
    out = {}
    for b in BACKENDS:
        for graph in ("ring", "exponential"):
            options = dict(strategy="gossip", gossip_graph=graph, momentum=0.9, net=bn_net)
            ref = job.trainer(b, strategy="local-sgd", period=1, warmup=0, momentum=0.9, net=bn_net)
            g = job.trainer(b, **options)
            model_bytes = sum(x.numel() for x in (*g.whole_model().parameters(), *g.whole_model().buffers())
                              if x.is_floating_point()) * 8
            for step in range(5):
                job.train(ref, 1)
                g.traffic.take()  # one counter per backend: the reference's bytes are not gossip's
                job.train(g, 1)
                sent, _, syncs, peer, peers, *_ = g.traffic.take()
                check(sent == model_bytes and syncs == 1 and peers == 1 and peer > 0,
                      f"{b} {graph}: step {step} sent {sent} B ({model_bytes} expected), peer distance {peer}")
            d = diff(ref, g)
            check(d < EXACT, f"{b} {graph}: gossip on 2 ranks differs from local SGD K=1 by {d}")
            state = job.checkpoint(g)
            consensus = g.traffic.take()[5]
            check(job.spread(g) == 0.0, f"{b} {graph}: a save did not settle the ranks")
            job.train(g, 3)
            resumed = job.resumed(b, state, **options)
            job.train(resumed, 3)
            r = diff(g, resumed)
            check(r < EXACT, f"{b} {graph}: gossip resumed at step 5 differs from the uninterrupted run by {r}")
            out.update({f"{graph}_vs_local_sgd_{b}": d, f"{graph}_resume_diff_{b}": r,
                        f"{graph}_bytes_per_step_{b}": model_bytes, f"{graph}_consensus_at_save_{b}": consensus})
    return out


def gossip_mixing(job: Job) -> dict:
    """Every rank starts from its own weights (no broadcast); mixing steps alone (no gradient): the mean over ranks
    never moves; the exponential graph reaches it exactly after log2(size) steps on 2^m ranks; the ring's spread
    shrinks every step."""
    out = {}
    for graph in ("exponential", "ring"):
        t = job.trainer("mpi", strategy="gossip", gossip_graph=graph)
        torch.manual_seed(50 + job.rank)
        with torch.no_grad():
            for p in t.whole_model().parameters():
                p.copy_(torch.randn_like(p))
        mean, spreads = t.backend.allreduce(flat(t).clone(), "mean"), [job.spread(t)]
        for step in range(4):
            t.plan.sync.mix(list(t.whole_model().parameters()), step)
            spreads.append(job.spread(t))
            moved = (t.backend.allreduce(flat(t).clone(), "mean") - mean).abs().max().item()
            check(moved < EXACT, f"{graph}: gossip moved the mean over ranks by {moved} at step {step}")
        if graph == "exponential" and job.size & (job.size - 1) == 0:
            rounds = job.size.bit_length() - 1
            check(spreads[rounds] < EXACT, f"exponential graph: spread {spreads[rounds]} after {rounds} steps")
        check(all(b < a for a, b in zip(spreads, spreads[1:]) if a > EXACT), f"{graph}: spreads {spreads}")
        t.traffic.take()
        t.plan.sync.drifted = True  # as after a step: a save averages the ranks and measures how far apart they were
        job.checkpoint(t)
        consensus = t.traffic.take()[5]
        check(job.spread(t) == 0.0 and (consensus > EXACT) == (spreads[-1] > EXACT), f"{graph}: settle, {consensus}")
        out[f"{graph}_spreads"], out[f"{graph}_consensus_at_save"] = spreads, consensus
    return out


# ---- bytes per step ---------------------------------------------------------------------------------------
def traffic(job: Job) -> dict:
    out = {}
    for b in BACKENDS:
        for name, options in (("allreduce", {}), ("powersgd", POWER), ("zero", dict(zero=True))):
            t = job.trainer(b, **options)
            job.train(t, 4)
            t.traffic.take()
            job.train(t, 1)
            out[f"{name}_{b}"] = t.traffic.take()[0]
    params = sum(p.numel() for p in mlp().parameters()) * 8
    owned = out["zero_mpi"] - params
    check(all(out[f"allreduce_{b}"] == params for b in BACKENDS), f"allreduce bytes {out} != {params}")
    check(out["zero_mpi"] == out["zero_horovod"] and 0 < owned <= params // 2 + 8, f"ZeRO bytes {out}")
    check(all(out[f"powersgd_{b}"] < params for b in BACKENDS), f"PowerSGD sends no less than allreduce: {out}")
    check(out["powersgd_mpi"] == out["powersgd_horovod"] == out["powersgd_ddp"], f"PowerSGD bytes differ: {out}")
    return {**out, "params_bytes": params}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="local_sgd,powersgd,zero,gossip,traffic")
    a = p.parse_args()
    job = Job()
    out, timings = {"rank": job.rank, "size": job.size}, {}
    for name in a.only.split(","):
        start = time.perf_counter()
        out[name] = globals()[name](job)
        timings[name] = round(time.perf_counter() - start, 2)
    out["seconds"] = timings
    report(job, out)


def report(job: Job, out: dict) -> None:
    """Rank 0 prints every rank's line (mpirun forwards long lines in pieces, and two ranks' pieces interleave);
    then every backend ends."""
    gathered = job.runtimes["mpi"].backend.allgather_object(out)
    if job.rank == 0:
        sys.stdout.write("".join(f"OK {r} {json.dumps(o)}\n" for r, o in enumerate(gathered)))
        sys.stdout.flush()
    for rt in job.runtimes.values():
        rt.backend.barrier()
    job.runtimes["ddp"].backend.shutdown()
    job.runtimes["horovod"].backend.shutdown()


if __name__ == "__main__":
    main()
