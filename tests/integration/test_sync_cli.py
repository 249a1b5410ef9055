"""Each synchronization strategy end to end through `python -m hpctrain.resnet`: the demo (configs/demo.toml:
ResNet-18 on the built-in shapes, 2 ranks, one epoch of 156 steps) stopped by SIGUSR1 part way, resumed by the same
command, trained to the end with no step lost or repeated, to >= 85 % validation top-1; the bytes per step in the
metrics as the strategy sends them. One run per strategy, each on another backend (the demo is the expensive part:
about 1-2.5 min on 2 cores); gossip on 4 ranks over 2 epochs (the same 156 steps), the asynchronous parameter server
as 2 workers + 1 server. Then a ZeRO checkpoint across world sizes: 1 rank without ZeRO -> 2 ranks with ZeRO ->
1 rank without ZeRO (configs/tiny.toml)."""
import signal

import pytest
import torch

from hpctrain.errors import EXIT_PREEMPTED
from tests.launch import check_ok, finish, metrics, run, signal_ranks, start, trained, wait_for

DEMO = ["-m", "hpctrain.resnet", "--config", "configs/demo.toml", "--log-every", "10", "--progress", "never"]
STEPS = 156  # 10,000 shapes / (2 ranks x 32)
RESNET18_BYTES = 11_181_642 * 4  # the float32 parameters of ResNet-18 with 10 classes: what allreduce sends per step


@pytest.mark.acceptance  # three demo trainings, ~2 min each on 2 cores: make test-acceptance
@pytest.mark.parametrize("strategy, backend, np_", [
    (["--sync", "local-sgd"], "horovod", 2), (["--sync", "powersgd"], "ddp", 2), (["--zero"], "mpi", 2),
    (["--sync", "gossip", "--epochs", "2"], "mpi", 4), (["--sync", "ps", "--ps-mode", "async"], "mpi", 3)],
    ids=["local-sgd", "powersgd", "zero", "gossip", "ps-async"])
def test_demo_preempted_resumed_and_accurate(tmp_path, strategy, backend, np_, record_property):
    # the parameter server: 2 workers (the demo's 2 replicas) + 1 server, asynchronous (staleness 2); gossip on 4
    # ranks over 2 epochs (the demo's 156 steps)
    d = tmp_path / "run"
    args = [*DEMO, *strategy, "--backend", backend, "--run-dir", str(d)]
    job = start(np_, args)
    assert wait_for(lambda: trained(d, 5), 400), finish(job, 5)[-3000:]  # 50 steps: past PowerSGD's start
    assert signal_ranks(job, signal.SIGUSR1) == np_
    out = finish(job, 300)
    assert job.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = metrics(d, "train")[-1]["step"]
    assert f"stopped at step {stopped} on SIGUSR1, checkpoint saved" in out, out[-3000:]
    out = check_ok(run("mpirun", np_, args, timeout=600))
    assert f"at step {stopped}" in out and "resumed from" in out
    steps = [r["step"] for r in metrics(d, "train")]
    assert steps == [*range(10, STEPS, 10), STEPS], steps  # every window once: no step lost or repeated
    top1 = metrics(d, "eval")[-1]["val_top1"]
    assert top1 >= 0.85, f"{strategy}: val top-1 {top1}"
    per_step = [r["sent_bytes_per_step"] for r in metrics(d, "train")]
    record_property("val_top1", top1)  # for the figures (pytest --junitxml)
    record_property("sent_bytes_per_step", per_step)
    if "local-sgd" in strategy:  # the model every 4 steps: a quarter of allreduce's bytes, counted as syncs
        assert all(r["syncs"] > 0 for r in metrics(d, "train")[:-1])
        assert all(0.2 < b / RESNET18_BYTES < 0.35 for b in per_step[1:-1]), per_step
    elif "powersgd" in strategy:  # rank-8 factors after step 10: a few percent of allreduce's bytes
        assert all(b < 0.1 * RESNET18_BYTES for b in per_step[2:]), per_step
    elif "ps" in strategy:  # per replica: each worker pushes the gradient, the server returns the weights to each
        assert all(abs(b / RESNET18_BYTES - 2.0) < 0.01 for b in per_step[1:-1]), per_step
    elif "gossip" in strategy:  # the model (+ BatchNorm's statistics) to one peer a step; a save's average adds more
        mixing = [r["sent_bytes_per_step"] for r in metrics(d, "train")[1:-1] if "consensus_distance" not in r]
        assert len(mixing) > 8 and all(1.0 < b / RESNET18_BYTES < 1.01 for b in mixing), per_step
        assert all(r["peer_distance"] > 0 for r in metrics(d, "train"))
    else:  # ZeRO: the reduce-scatter's input (every gradient) + this rank's share of the allgather
        assert all(abs(b / RESNET18_BYTES - 1.5) < 0.01 for b in per_step), per_step


def test_zero_checkpoint_across_world_sizes_and_without_zero(tmp_path):
    d = tmp_path / "run"
    tiny = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--optimizer", "adamw", "--lr", "0.001",
            "--run-dir", str(d), "--checkpoint-every", "2"]
    check_ok(run("single", 1, [*tiny, "--backend", "none", "--max-steps", "2"]))
    out = check_ok(run("mpirun", 2, [*tiny, "--backend", "horovod", "--zero", "--max-steps", "4"]))
    assert "at step 2" in out and "written by 1 rank(s), now 2" in out  # an unsharded checkpoint, sharded
    out = check_ok(run("single", 1, [*tiny, "--backend", "none", "--max-steps", "6"]))
    assert "at step 4" in out and "written by 2 rank(s), now 1" in out  # a ZeRO checkpoint, unsharded
    states = [torch.load(d / "checkpoints" / f"ckpt-{s:08d}.pt", weights_only=True)["optimizer"] for s in (2, 4, 6)]
    for state in states:  # the same whole-model format whoever wrote it: every parameter's AdamW moments
        assert len(state["state"]) == sum(len(g["params"]) for g in state["param_groups"])
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(state["state"][0])
    assert [float(s["state"][0]["step"]) for s in states] == [2.0, 4.0, 6.0]
    records = metrics(d, "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # the optimizer state the largest rank holds: AdamW's two moments of every parameter unsharded, ~1/2 with ZeRO-1
    whole = 2 * RESNET18_BYTES / 2**20
    held = [r["optimizer_state_mib_max"] / whole for r in records]
    assert all(abs(h - 1) < 0.01 for h in held[:2] + held[4:]) and all(0.45 < h <= 0.55 for h in held[2:4]), held


def test_gossip_trains_saves_the_average_and_resumes(tmp_path):
    # configs/tiny.toml (96 samples: 6 steps), 2 ranks, ring gossip over mpi4py on the horovod backend: 4 steps with
    # saves at 2 and 4 (each averages the ranks: consensus_distance in the next record), resumed to 6.
    d = tmp_path / "run"
    tiny = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--sync", "gossip", "--gossip-graph", "ring",
            "--backend", "horovod", "--run-dir", str(d), "--checkpoint-every", "2", "--synthetic-size", "96"]
    out = check_ok(run("mpirun", 2, [*tiny, "--max-steps", "4"]))
    assert "gossip: each step the model mixed with its two ring neighbours" in out, out[-2000:]
    out = check_ok(run("mpirun", 2, [*tiny, "--max-steps", "6"]))
    assert "at step 4" in out and "resumed from" in out
    records = metrics(d, "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    ckpt = torch.load(d / "checkpoints" / "ckpt-00000006.pt", weights_only=True)
    model_bytes = sum(v.numel() * v.element_size() for v in ckpt["model"].values() if v.is_floating_point())
    momentum_bytes = sum(v.numel() * v.element_size() for state in ckpt["optimizer"]["state"].values()
                         for v in state.values() if v.ndim > 0)
    settled = [r for r in records if "consensus_distance" in r]
    assert [r["step"] for r in settled] == [3], records  # the save after step 2 (the one after 4: in the first run)
    for r in records:  # one peer on 2 ranks: the model (parameters + BatchNorm statistics) each step, counted a sync;
        # a save's average adds the model and SGD's momentum once
        sent = model_bytes * (2 if r in settled else 1) + (momentum_bytes if r in settled else 0)
        assert r["sent_bytes_per_step"] == sent and r["peer_distance"] > 0, r
    assert settled[0]["consensus_distance"] == 0.0  # on 2 ranks each mix IS the average (4 ranks: tests/parallel)


def test_gossip_on_one_rank_is_one_line(tmp_path):
    p = run("single", 1, ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--sync", "gossip", "--backend",
                          "mpi", "--run-dir", str(tmp_path / "run")])
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "'gossip' mixes models between ranks, but this job has 1 rank (allowed on one rank: --sync allreduce)" in \
        p.stderr and len([x for x in p.stderr.splitlines() if x.strip()]) == 1, p.stderr[-2000:]


def test_parameter_server_trains_and_its_checkpoints_resume_on_allreduce_and_back(tmp_path):
    # configs/tiny.toml: 3 ranks = 2 workers + 1 server (the last rank), 64 samples / (2 workers x 8) = 4 steps per
    # epoch; then 2 ranks on plain allreduce from the PS checkpoint, then the PS again from the allreduce one, then
    # asynchronous serving from the synchronous one.
    d = tmp_path / "run"
    tiny = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--backend", "mpi", "--run-dir", str(d),
            "--epochs", "4", "--optimizer", "adamw", "--lr", "0.001"]
    ps = ["--sync", "ps", "--ps-servers", "1"]
    out = check_ok(run("mpirun", 3, [*tiny, *ps, "--max-steps", "4"]))
    assert "parameter server: the last 1 rank(s) hold the weights" in out and "x 2 replica(s)" in out, out[-2000:]
    out = check_ok(run("mpirun", 2, [*tiny, "--max-steps", "8"]))
    assert "at step 4" in out and "written by 3 rank(s), now 2" in out, out[-2000:]
    out = check_ok(run("mpirun", 3, [*tiny, *ps, "--max-steps", "12"]))
    assert "at step 8" in out, out[-2000:]
    out = check_ok(run("mpirun", 3, [*tiny, *ps, "--ps-mode", "async", "--staleness", "1", "--max-steps", "16"]))
    assert "at step 12" in out and "asynchronously: each gradient applied on arrival, a worker at most 1" in out
    records = metrics(d, "train")
    assert [r["step"] for r in records] == list(range(1, 17))
    assert all(r["staleness"] >= 0 for r in records[12:]) and all("staleness" not in r for r in records[:12])
    # per worker, how old the weights were that its gradients were applied on: each of its 4 pushes counted once
    rows = [r["staleness_histogram"] for r in records[12:]]
    assert [sum(sum(w[i]) for w in rows) for i in range(2)] == [4, 4], rows
    ckpt = torch.load(d / "checkpoints" / "ckpt-00000016.pt", weights_only=True)
    model_bytes = sum(v.numel() * v.element_size() for k, v in ckpt["model"].items() if "running" not in k
                      and v.is_floating_point())
    assert len(ckpt["optimizer"]["state"]) == sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    # the job's bytes per replica (2 workers): each worker pushes the gradient once, the server returns it to both
    for r in records[9:12]:
        assert r["sent_bytes_per_step"] == 2 * model_bytes, r


def test_parameter_server_without_a_worker_is_one_line(tmp_path):
    p = run("mpirun", 2, ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--sync", "ps", "--ps-servers",
                          "2", "--backend", "mpi", "--run-dir", str(tmp_path / "run")])
    lines = [x for x in p.stderr.splitlines() if x.startswith("hpctrain")]
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-2000:]
    assert "sync.ps_servers (--ps-servers): 2 server(s) leave no worker among the 2 rank(s) of this job (allowed: 1 " \
           "to 1)" in lines[0]
