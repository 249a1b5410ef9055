"""The batch template on a real Slurm cluster: 8 nodes end to end, and preemption -> requeue -> resume."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT
from tests.slurm.conftest import diagnostics, job_env, job_info, sbatch, wait_for_job

TEMPLATE = str(ROOT / "slurm" / "resnet_8node.sh")
TINY = ["--config", "configs/tiny.toml"]


def _train_steps(run_dir: Path) -> list[dict]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_resnet_8node_template(slurm, tmp_path):
    # Submitted from the repository root without HPCTRAIN_ROOT: the job finds it via SLURM_SUBMIT_DIR.
    # 128 samples / 8 ranks / batch 8 = 2 steps.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    before = {n: slurm.hosts.counters(n) for n in slurm.names}
    t0 = time.monotonic()
    job = sbatch(slurm, ["--output", str(out), TEMPLATE, *TINY, "--synthetic-size", "128", "--run-dir", str(run_dir)],
                 HPCTRAIN_SITE="testcluster")
    info = wait_for_job(slurm, job, timeout=240, output=out)
    took = time.monotonic() - t0
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), diagnostics(slurm, out)
    assert info["NumNodes"] == "8" and info["NodeList"] == "node[1-8]"
    assert "site testcluster" in text and "restart 0 on 8 node(s)" in text
    assert "hpctrain.resnet: slurm launcher, 8 rank(s) on 8 node(s)" in text  # every rank saw the same world
    assert "horovod backend, device cpu" in text and text.count("done at step 2") == 1
    assert [r["step"] for r in _train_steps(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "ckpt-00000002.pt").exists()
    # Every node is a host with its own link: the gradients crossed each of them. Whatever the allreduce's
    # algorithm, each rank sends and receives at least (N-1)/N of what it hands to it.
    handed = sum(r.get("sent_bytes", 0) for r in _train_steps(run_dir))
    assert handed > 40e6
    grew = {n: {way: slurm.hosts.counters(n)[way] - before[n][way] for way in ("tx", "rx")} for n in slurm.names}
    assert all(g[way] >= 7 / 8 * handed for g in grew.values() for way in ("tx", "rx")), (handed, grew)
    print(f"\n8-node job: submitted -> COMPLETED in {took:.1f} s; allreduce handed {handed / 1e6:.1f} MB per rank, "
          f"each host's eth0 sent {min(g['tx'] for g in grew.values()) / 1e6:.1f}-"
          f"{max(g['tx'] for g in grew.values()) / 1e6:.1f} MB", file=sys.stderr)


def test_preemption_requeues_and_resumes_exactly(slurm, tmp_path):
    # Two identical 2-node runs side by side: A gets SIGUSR1 (as from --signal=B:USR1@lead) after a few
    # steps, saves, exits 85, requeues itself and resumes; B (submitted through python -m hpctrain.slurm)
    # runs uninterrupted. 512 samples / 2 ranks / batch 8 = 32 steps.
    args = [*TINY, "--synthetic-size", "512", "--deterministic"]
    a_dir, b_dir, a_out = tmp_path / "a", tmp_path / "b", tmp_path / "a.out"
    a = sbatch(slurm, ["--nodes=2", "--output", str(a_out), TEMPLATE, *args, "--run-dir", str(a_dir)],
               HPCTRAIN_SITE="testcluster")
    helper = subprocess.run([sys.executable, "-m", "hpctrain.slurm", "--nodes", "2", "--site", "testcluster",
                             "--time", "20", "--job-name", "reference", "--submit", "--", *args, "--run-dir",
                             str(b_dir)], cwd=tmp_path, env=job_env(slurm), capture_output=True, text=True, timeout=60)
    assert helper.returncode == 0 and "Submitted batch job" in helper.stdout, helper.stdout + helper.stderr
    b = helper.stdout.split()[-1]

    deadline = time.monotonic() + 180
    while len(_train_steps(a_dir)) < 3:
        assert time.monotonic() < deadline, "run A made no progress\n" + diagnostics(slurm, a_out)
        assert job_info(slurm, a)["JobState"] in ("PENDING", "RUNNING"), diagnostics(slurm, a_out)
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", "--batch", a)
    t_signal = time.monotonic()

    seen: list = []
    info_a = wait_for_job(slurm, a, timeout=240, output=a_out, seen=seen)
    t_done = time.monotonic()
    info_b = wait_for_job(slurm, b, timeout=120, output=tmp_path / f"reference-{b}.out")
    text = a_out.read_text()
    assert (info_a["JobState"], info_a["ExitCode"], info_a["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        diagnostics(slurm, a_out)
    assert (info_b["JobState"], info_b["ExitCode"], info_b["Restarts"]) == ("COMPLETED", "0:0", "0")

    # The signal path, in the order it happened: batch shell -> step -> agreed stop -> save -> 85 -> requeue.
    stop = int(text.split("stopping at step ")[1].split()[0])
    assert 3 <= stop < 32 and stop % 10 == 0, text  # default run.preempt_check_every = 10
    expected = ["restart 0 on 2 node(s)", "batch script got SIGUSR1", "forwarding it to the job step as SIGUSR1",
                f"stopping at step {stop} on SIGUSR1: checkpoint saved",
                "exit 85 (requeue or rerun the same command to resume)",
                f"requeueing job {a}", "restart 1 on 2 node(s)", f"ckpt-{stop:08d}.pt at step {stop}",
                "done at step 32"]
    positions = [text.find(e) for e in expected]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(expected, positions))

    # No step lost or repeated across the restart (the resumed run appends to the same metrics.jsonl),
    # and the resumed run continues the uninterrupted one exactly.
    steps_a, steps_b = _train_steps(a_dir), _train_steps(b_dir)
    assert [r["step"] for r in steps_a] == list(range(1, 33)) == [r["step"] for r in steps_b]
    for ra, rb in zip(steps_a, steps_b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 * max(1.0, abs(rb["loss"])), (ra["step"], ra["loss"], rb["loss"])
    final_a = torch.load(a_dir / "checkpoints" / "ckpt-00000032.pt", weights_only=True)
    final_b = torch.load(b_dir / "checkpoints" / "ckpt-00000032.pt", weights_only=True)
    assert final_a["step"] == final_b["step"] == 32 and final_a["model"].keys() == final_b["model"].keys()
    # Relative to each tensor's scale: BN running variances (up to ~50 here) were averaged across ranks
    # once more in run A (at its preemption save), which is exact in real numbers but not in float32.
    rel = {k: (final_a["model"][k].double() - v.double()).abs().max().item()
           / max(1.0, v.double().abs().max().item()) for k, v in final_b["model"].items()}
    diff = max(rel.values())
    assert diff < 1e-6, f"final tensors differ: {max(rel, key=rel.get)} by {diff:.2e} (relative)"

    t_requeued = next((t for t, i in seen if i.get("Restarts") == "1"), float("nan"))
    t_rerun = next((t for t, i in seen if i.get("Restarts") == "1" and i.get("JobState") == "RUNNING"), float("nan"))
    print(f"\npreemption: USR1 -> requeued {t_requeued - t_signal:.1f} s, -> running again "
          f"{t_rerun - t_signal:.1f} s, -> finished {t_done - t_signal:.1f} s (stopped at step {stop}, "
          f"final tensors max relative diff {diff:.1e})", file=sys.stderr)


def test_array_task_requeued_on_batch_sigterm_but_not_after_scancel(slurm, tmp_path):
    # The batch side alone, with a real srun step standing in for the trainer (it exits 85 on a
    # signal, as hpctrain.resnet does after saving, and 0 once restarted). Task 3: SIGTERM to the batch
    # shell reaches the step as SIGUSR1 (srun would end the step on SIGTERM) and the job requeues
    # that array task (<array job>_3, not the whole array). Task 4: a plain scancel must stay a cancel.
    script = tmp_path / "array.sh"
    script.write_text("""#!/bin/bash
#SBATCH --nodes=1 --requeue --open-mode=append
source "$HPCTRAIN_ROOT/slurm/env.sh" || exit 2
srun "${HPCTRAIN_SRUN_ARGS[@]}" bash -c '
  [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && { echo "step: resumed"; exit 0; }
  trap "echo step: got USR1; exit 85" USR1
  trap "echo step: got TERM; exit 85" TERM
  echo step: waiting; sleep 120 & wait' &
hpctrain_supervise $!
""")
    array = sbatch(slurm, ["--array=3-4", "--output", str(tmp_path / "array-%A_%a.out"), str(script)], cwd=tmp_path,
                   HPCTRAIN_ROOT=str(ROOT), HPCTRAIN_SITE="testcluster")
    outs = {t: tmp_path / f"array-{array}_{t}.out" for t in (3, 4)}
    deadline = time.monotonic() + 60
    while not all(o.exists() and "step: waiting" in o.read_text() for o in outs.values()):
        assert time.monotonic() < deadline, diagnostics(slurm, outs[3]) + diagnostics(slurm, outs[4])
        time.sleep(0.3)
    slurm.run("scancel", "--signal=TERM", "--batch", f"{array}_3")
    slurm.run("scancel", f"{array}_4")
    info3 = wait_for_job(slurm, f"{array}_3", timeout=90, output=outs[3])
    info4 = wait_for_job(slurm, f"{array}_4", timeout=60, output=outs[4])
    text3, text4 = outs[3].read_text(), outs[4].read_text()
    assert (info3["JobState"], info3["ExitCode"], info3["Restarts"]) == ("COMPLETED", "0:0", "1"), text3
    assert info3["ArrayJobId"] == array and info3["ArrayTaskId"] == "3"
    for line in ("batch script got SIGTERM", "forwarding it to the job step as SIGUSR1", "step: got USR1",
                 f"requeueing job {array}_3 ", "restart 1 on 1 node(s)", "step: resumed"):
        assert line in text3, text3
    assert (info4["JobState"], info4["Restarts"]) == ("CANCELLED", "0"), text4
    assert f"Slurm is ending job {array}_4 (JobState=COMPLETING): not requeueing" in text4, text4
    assert "step: resumed" not in text4


def test_bert_template_on_two_nodes(slurm, tmp_path):
    # The BERT template with the built-in corpus (prepared by rank 0, the other rank waits for it).
    run_dir, out = tmp_path / "run", tmp_path / "bert.out"
    job = sbatch(slurm, ["--nodes=2", "--output", str(out), str(ROOT / "slurm" / "bert_multinode.sh"),
                         "--config", "configs/bert_tiny.toml", "--max-steps", "3", "--log-every", "1",
                         "--corpus-cache", str(tmp_path / "corpus"), "--run-dir", str(run_dir)],
                 HPCTRAIN_SITE="testcluster")
    info = wait_for_job(slurm, job, timeout=300, output=out)
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), diagnostics(slurm, out)
    assert info["NumNodes"] == "2"
    assert "hpctrain.bert: slurm launcher, 2 rank(s) on 2 node(s)" in text and text.count("done at step 3") == 1
    assert [r["step"] for r in _train_steps(run_dir)] == [1, 2, 3]
    assert (run_dir / "hf" / "config.json").exists()


PIPELINE = str(ROOT / "slurm" / "pipeline_hybrid.sh")


def _plan_stages(run_dir: Path) -> list:
    return json.loads((run_dir / "pipeline_plan.json").read_text())["stages"]


def _wait_or_dump(slurm, job: str, timeout: float, output: Path, run_dir: Path) -> dict:
    """wait_for_job; on a timeout also show the job's ranks still alive and their native stacks (where
    they wait: a receive, MPI_Finalize, ...), since the job's processes are gone once the cluster stops."""
    try:
        return wait_for_job(slurm, job, timeout=timeout, output=output)
    except pytest.fail.Exception as e:
        ps = subprocess.run(["ps", "-eo", "pid,stat,wchan:24,etimes,pcpu,args"], capture_output=True, text=True)
        ranks = [ln for ln in ps.stdout.splitlines() if f"--run-dir {run_dir}" in ln and "hpctrain." in ln]
        stacks = []
        for line in ranks if shutil.which("gdb") else []:
            pid = line.split()[0]
            bt = subprocess.run(["gdb", "-p", pid, "-batch", "-ex", "thread apply all bt 10"], capture_output=True,
                                text=True, timeout=60)
            stacks.append(f"--- rank pid {pid}\n" + "\n".join(ln for ln in bt.stdout.splitlines()
                                                                if ln.startswith(("#", "Thread"))))
        pytest.fail(f"{e}\n--- ranks still running\n" + "\n".join(ranks) + "\n" + "\n".join(stacks))


def test_pipeline_hybrid_template(slurm, tmp_path):
    # 2 nodes x 2 ranks = 2 stages x 2 replicas, one MPI job started by srun --mpi=pmix (mpi4py's
    # COMM_WORLD). Submitted from tmp_path: the default RUN_DIR is <submit dir>/runs/pipeline-<job id>.
    out = tmp_path / "pipeline.out"
    t0 = time.monotonic()
    job = sbatch(slurm, ["--nodes=2", "--ntasks-per-node=2", "--output", str(out), PIPELINE, *TINY,
                         "--synthetic-size", "256", "--max-steps", "3"],
                 cwd=tmp_path, HPCTRAIN_ROOT=str(ROOT), HPCTRAIN_SITE="testcluster", MICRO_BATCHES="4")
    run_dir = tmp_path / "runs" / f"pipeline-{job}"
    info = _wait_or_dump(slurm, job, 180, out, run_dir)
    took = time.monotonic() - t0
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), diagnostics(slurm, out)
    assert info["NumNodes"] == "2" and info["NumTasks"] == "4"
    assert f"hpctrain: pipeline 2 stage(s) x 2 replica(s) = 4 ranks, run dir {run_dir}" in text
    assert "hpctrain.resnet: slurm launcher, 4 rank(s) on 2 node(s)" in text
    assert text.count("pipeline plan (time, ") == 1 and "pipeline backend" in text
    assert text.count("done at step 3") == 1
    assert len(_plan_stages(run_dir)) == 2
    assert [r["step"] for r in _train_steps(run_dir)] == [1, 2, 3]
    print(f"\npipeline 2x2 job: submitted -> COMPLETED in {took:.1f} s", file=sys.stderr)


def test_pipeline_requeue_reuses_run_dir_and_plan(slurm, tmp_path):
    # Preempted once (USR1 as from the time-limit lead): the requeued job has the same job id, so the
    # same default RUN_DIR; it reuses the saved plan instead of profiling again and resumes.
    # 512 samples / 2 replicas / (2 micro-batches x 8) = 16 steps.
    out = tmp_path / "pipeline.out"
    t0 = time.monotonic()
    job = sbatch(slurm, ["--nodes=2", "--ntasks-per-node=2", "--output", str(out), PIPELINE, *TINY,
                         "--synthetic-size", "512", "--preempt-check-every", "2"],
                 cwd=tmp_path, HPCTRAIN_ROOT=str(ROOT), HPCTRAIN_SITE="testcluster", MICRO_BATCHES="2")
    run_dir = tmp_path / "runs" / f"pipeline-{job}"
    deadline = time.monotonic() + 120
    while len(_train_steps(run_dir)) < 2:
        assert time.monotonic() < deadline, "no progress\n" + diagnostics(slurm, out)
        assert job_info(slurm, job)["JobState"] in ("PENDING", "RUNNING"), diagnostics(slurm, out)
        time.sleep(0.3)
    plan = (run_dir / "pipeline_plan.json").read_text()
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = _wait_or_dump(slurm, job, 180, out, run_dir)
    took = time.monotonic() - t0
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        diagnostics(slurm, out)
    stop = int(text.split("stopping at step ")[1].split()[0])
    expected = ["restart 0 on 2 node(s)", f"run dir {run_dir}", "pipeline: time plan saved to", "pipeline plan (",
                "exit 85 (requeue or rerun the same command to resume)", f"requeueing job {job}",
                "restart 1 on 2 node(s)", f"run dir {run_dir}",
                f"pipeline: reused plan {run_dir / 'pipeline_plan.json'}", "pipeline plan (",
                f"ckpt-{stop:08d}.pt at step {stop}", "done at step 16"]
    positions, at = [], 0
    for e in expected:  # in this order, each after the previous one
        at = text.find(e, at)
        positions.append(at)
        assert at >= 0, (e, list(zip(expected, positions)), text[-3000:])
    assert (run_dir / "pipeline_plan.json").read_text() == plan and len(_plan_stages(run_dir)) == 2
    assert [r["step"] for r in _train_steps(run_dir)] == list(range(1, 17))
    print(f"\npipeline requeue job: stopped at step {stop}, submitted -> COMPLETED in {took:.1f} s", file=sys.stderr)


def test_pipeline_template_refuses_indivisible_world(slurm, tmp_path):
    # 3 ranks cannot form 2 stages: one line and exit 2 from the batch script, no job step started.
    out = tmp_path / "bad.out"
    job = sbatch(slurm, ["--nodes=3", "--output", str(out), PIPELINE, *TINY], cwd=tmp_path,
                 HPCTRAIN_ROOT=str(ROOT), HPCTRAIN_SITE="testcluster")
    info = wait_for_job(slurm, job, timeout=60, output=out)
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
    assert "hpctrain: error: PIPELINE_STAGES=2 does not divide the 3 ranks of this job" in text
    assert "hpctrain.resnet" not in text and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("nodes, backend, samples", [(4, "horovod", 512), (2, "multiworker", 256)],
                         ids=["4node-horovod", "2node-multiworker"])
def test_tf_template_preempted_requeues_and_resumes(slurm, tmp_path, nodes, backend, samples):
    # The unchanged template with --framework tf: USR1 -> agreed stop -> save -> exit 85 -> requeue -> resume
    # from the .npz checkpoint -> done; every step once. samples / nodes / batch 8 = 16 steps per epoch, 2
    # epochs; the ranks agree on a stop every 2 steps. sbatch --nodes overrides the template's 8 (all 8: the
    # PyTorch tests; 8 TensorFlow processes on a 2-core test machine took 7.5 min, 4 prove the same). On 2 nodes
    # with tf.distribute's MultiWorkerMirroredStrategy: TF_CONFIG built from the step (worker hosts gathered
    # over the PMIx-started MPI, since the emulated nodes' names do not resolve), the stop agreed through the
    # strategy's own reduction.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, ["--nodes", str(nodes), "--output", str(out), TEMPLATE, *TINY, "--framework", "tf",
                         "--backend", backend, "--synthetic-size", str(samples), "--epochs", "2",
                         "--preempt-check-every", "2", "--run-dir", str(run_dir)], HPCTRAIN_SITE="testcluster")
    deadline = time.monotonic() + 300
    while len(_train_steps(run_dir)) < 3:
        assert time.monotonic() < deadline, "no progress\n" + diagnostics(slurm, out)
        assert job_info(slurm, job)["JobState"] in ("PENDING", "RUNNING"), diagnostics(slurm, out)
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_for_job(slurm, job, timeout=420, output=out)
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), diagnostics(slurm, out)
    assert f"hpctrain.resnet: slurm launcher, {nodes} rank(s) on {nodes} node(s)" in text
    assert f"{backend} backend, device CPU:0" in text
    stop = int(text.split("stopping at step ")[1].split()[0])
    assert 3 <= stop < 32 and stop % 2 == 0, text[-3000:]
    expected = [f"stopping at step {stop} on SIGUSR1: checkpoint saved",
                "exit 85 (requeue or rerun the same command to resume)",
                f"requeueing job {job}", f"restart 1 on {nodes} node(s)", f"ckpt-{stop:08d}.npz at step {stop}",
                "done at step 32"]
    positions = [text.find(e) for e in expected]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(expected, positions))
    assert [r["step"] for r in _train_steps(run_dir)] == list(range(1, 33))  # none lost or repeated
    assert (run_dir / "checkpoints" / "ckpt-00000032.npz").exists()
