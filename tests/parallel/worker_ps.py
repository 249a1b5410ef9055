"""Run under mpirun -np 3 (1 server + 2 workers) or -np 4 (--servers 2). The parameter server (engine/torch/sync/
ps.py) through the real Trainer path, in float64, against the reference case: one process taking the same steps on
the workers' whole global batch (what allreduce SGD over the workers computes), on the horovod, mpi and ddp
backends:

    SGD with momentum, AdamW     the workers' weights == the reference's, step for step
    state                        the servers hold the optimizer state, split by bytes (a worker: none); the
                                 consolidated state == the reference optimizer's
    checkpoints                  a PS checkpoint continues on the reference (plain) path and a plain one on the PS,
                                 both equal to the uninterrupted reference
    bytes                        a worker sends the gradient once per step, a server its range once per worker
    BatchNorm                    a save averages the running statistics over the workers only
    asynchronous (mpi)           staleness 0 == synchronous (plain SGD); staleness 2 with a slow worker: the bound
                                 held (the server's record), the fast worker ran ahead within it

Prints `OK <rank> <json>` per rank (rank 0 prints all); any check that fails raises."""
import argparse
import copy
import time

import torch

from hpctrain.engine.torch import build_optimizer
from hpctrain.engine.torch.sync.zero import state_bytes
from tests.parallel.worker_sync import BACKENDS, EXACT, B, Exact, Job, bn_net, check, flat, report


class PSJob(Job):
    def __init__(self, servers: int):
        super().__init__()
        self.servers, self.workers = servers, self.size - servers
        self.serves = self.rank >= self.workers

    def global_batch(self, step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(B * self.workers, 8, generator=g, dtype=torch.float64)
        return x, torch.randint(0, 3, (B * self.workers,), generator=g)

    def batch(self, step):
        x, y = self.global_batch(step)
        w = self.rank % self.workers
        return x[w * B:(w + 1) * B], y[w * B:(w + 1) * B]


def reference(job: PSJob, t, options):
    """One process, the same initial weights (rank 0's, as restored), the global batch each step."""
    model = copy.deepcopy(t.whole_model())
    cfg = job.config("mpi", **{k: v for k, v in options.items() if k not in ("strategy", "ps_servers")})
    return model, build_optimizer(model, cfg.optim)


def ref_step(job, model, optimizer, step):
    optimizer.zero_grad()
    loss, _ = Exact()(model, job.global_batch(step))
    loss.backward()
    optimizer.step()


def compare(job, t, model) -> float:
    if job.serves:
        return 0.0  # a server's copy of the other servers' ranges is not kept current
    mine = flat(t)
    theirs = torch.cat([v.detach().reshape(-1) for v in (*model.parameters(),)])
    return (mine - theirs).abs().max().item()


def run(job: PSJob, b: str, opt: str) -> dict:
    options = dict(strategy="ps", ps_servers=job.servers, optimizer=opt, momentum=0.9, weight_decay=0.01)
    t = job.trainer(b, **options)
    model, optimizer = reference(job, t, options)
    worst, sent = 0.0, []
    for _ in range(4):
        job.train(t, 1)
        sent.append(t.traffic.take()[0])
        ref_step(job, model, optimizer, t.step - 1)
        worst = max(worst, compare(job, t, model))
    check(worst < EXACT, f"{b} {opt}: the parameter server differs from the reference by {worst}")
    params = sum(p.numel() for p in model.parameters()) * 8
    owned = state_bytes(t.optimizer)
    if job.serves:
        check(0 < owned and sent[-1] == t.optimizer.counts[job.rank] * 8 * job.workers, f"{b}: server {sent}")
    else:
        check(owned == 0 and sent[-1] == params, f"{b}: a worker holds {owned} B of state, sent {sent}")
    # checkpoints both ways: the consolidated state continues on the plain path; a plain state on the PS
    state = job.checkpoint(t)
    whole = job.runtimes[b].backend.broadcast_object(state)
    d_format = 0.0
    if not job.serves:
        mine = optimizer.state_dict()["state"]
        for i, entries in whole["optimizer"]["state"].items():
            for k, v in entries.items():
                if torch.is_tensor(v) and v.ndim > 0:
                    d_format = max(d_format, (v - mine[i][k]).abs().max().item())
        check(d_format < EXACT, f"{b} {opt}: the consolidated state differs from the reference's by {d_format}")
    resumed = job.resumed(b, state, **options)  # the PS from its own checkpoint
    # the trainer's per-step learning rate must reach the loaded optimizer (load_state_dict replaces its groups)
    check(resumed.optimizer.param_groups is resumed.optimizer.local.param_groups, f"{b}: stale param groups")
    plain_model, plain_opt = copy.deepcopy((model, optimizer))  # the reference goes on (one copy: linked)
    for _ in range(2):
        job.train(resumed, 1)
        ref_step(job, plain_model, plain_opt, resumed.step - 1)
    d_resume = compare(job, resumed, plain_model)
    check(d_resume < EXACT, f"{b} {opt}: the PS resumed from its checkpoint differs by {d_resume}")
    return {f"{opt}_diff_{b}": worst, f"{opt}_format_diff_{b}": d_format, f"{opt}_resume_diff_{b}": d_resume,
            f"{opt}_state_bytes_{b}": owned, f"{opt}_sent_per_step_{b}": sent[-1], "params_bytes": params}


def batchnorm_statistics(job: PSJob, b: str) -> dict:
    """A save's BatchNorm running statistics are the workers' mean (a server's never saw data)."""
    t = job.trainer(b, strategy="ps", ps_servers=job.servers, net=bn_net)
    job.train(t, 2)
    mine = torch.cat([x.detach().reshape(-1).clone() for x in t.whole_model().buffers() if x.is_floating_point()])
    every = job.runtimes[b].backend.allgather_object(mine)
    expected = sum(every[:job.workers]) / job.workers
    t.sync_buffers()
    settled = torch.cat([x.detach().reshape(-1) for x in t.whole_model().buffers() if x.is_floating_point()])
    d = (settled - expected).abs().max().item()
    check(d < EXACT and (every[0] - every[1]).abs().max().item() > 1e-6, f"{b}: BatchNorm statistics after a save {d}")
    return {f"batchnorm_diff_{b}": d}


class Slow(Exact):
    """The same loss, this many seconds later: a slow worker."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, model, batch):
        time.sleep(self.seconds)
        return super().__call__(model, batch)


def asynchronous(job: PSJob) -> dict:
    """--ps-mode async. Staleness 0, plain SGD: the same weights as synchronous serving (each gradient applied on
    arrival, scaled by 1/workers, sums the same update). Staleness 2 with worker 1 slowed: no reply ever let a worker
    more than 2 pushes ahead of the slowest (the server's record), and worker 0 did run ahead (replies at leads 1
    and 2: it did not wait while within the bound)."""
    plain = dict(strategy="ps", ps_servers=job.servers, optimizer="sgd", momentum=0.0)
    ts, ta = job.trainer("mpi", **plain), job.trainer("mpi", **plain, ps_mode="async", staleness=0)
    job.train(ts, 4)
    job.train(ta, 4)
    d = compare_trainers(job, ts, ta)
    check(d < EXACT, f"async with staleness 0 differs from sync by {d}")
    t = job.trainer("mpi", **plain, ps_mode="async", staleness=2)
    if job.rank == 1:
        t.task = Slow(0.15)
    t.traffic.take()
    job.train(t, 10)
    histogram = t.traffic.take()[9:]  # the metrics' per-worker staleness counts: worker 0's bins, then worker 1's
    job.checkpoint(t)  # a save pulls the servers' latest weights to every worker
    record = t.optimizer.record() if job.serves else None
    if record:
        rows = [histogram[:len(histogram) // 2], histogram[len(histogram) // 2:]]
        check(all(sum(row) == 10 for row in rows), f"each worker's 10 gradients in its row: {rows}")
        check({i: int(a + b) for i, (a, b) in enumerate(zip(*rows)) if a + b} == record["staleness"],
              f"the metrics' histogram {rows} is not the server's record {record['staleness']}")
        leads = record["leads"]
        check(len(leads[0]) == 3 and sum(map(sum, leads)) == 2 * 10, f"the replies: {leads}")
        check(leads[0][1] > 0 and leads[0][2] > 0, f"worker 0 never ran ahead: {leads}")
        check(max(record["staleness"]) > 0, f"no gradient was stale: {record}")
    every = job.runtimes["mpi"].backend.allgather_object(flat(t))  # a server's copy is stale by design
    spread = max((w - every[0]).abs().max().item() for w in every[:job.workers])
    check(spread == 0.0, f"after a save the workers' weights differ by {spread}")
    return {"async_s0_vs_sync": d, "async_record": record, "async_histogram": histogram if record else None,
            "settled_spread": spread}


def compare_trainers(job, a, b) -> float:
    return 0.0 if job.serves else (flat(a) - flat(b)).abs().max().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--servers", type=int, default=1)
    a = p.parse_args()
    job = PSJob(a.servers)
    out = {"rank": job.rank, "size": job.size, "serves": job.serves}
    for b in BACKENDS:
        for opt in ("sgd", "adamw"):
            out.update(run(job, b, opt))
        out.update(batchnorm_statistics(job, b))
    out.update(asynchronous(job))
    report(job, out)


if __name__ == "__main__":
    main()
