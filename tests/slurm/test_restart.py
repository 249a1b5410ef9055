"""Dead and frozen ranks on a real Slurm cluster: srun ends the step at once (--kill-on-bad-exit), the batch
script relaunches it in the same allocation (no requeue), the ranks resume from the newest checkpoint.

The faults are real: `kill -9` / `kill -STOP` of one rank's python process, found by its command line (the
run dir) and its Slurm identity in /proc/<pid>/environ (SLURM_PROCID, SLURM_STEP_ID, SLURMD_NODENAME).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.launch import ROOT
from tests.slurm.conftest import diagnostics, job_info, sbatch, wait_for_job

TEMPLATE = str(ROOT / "slurm" / "resnet_8node.sh")
TINY = ["--config", "configs/tiny.toml"]
RESTART_LINE = re.compile(r"hpctrain: restart (\d+)/(\d+) in the same allocation: step exit (\d+) \((.*?)\); "
                          r"blamed node\(s\) (\S+); excluded (\S+); last checkpoint step (\S+), last trained step "
                          r"(\S+), steps lost (\S+); at \d\d:\d\d:\d\d")


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if r.get("kind") == kind:
            out.append(r)
    return out


def _ranks(run_dir: Path) -> list[dict]:
    """The live rank processes of the run in `run_dir`: pid, rank, step id, node."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "hpctrain.resnet" not in cmd or str(run_dir) not in cmd:
            continue
        try:
            e = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "SLURM_PROCID" in e and "SLURM_STEP_ID" in e:
            found.append({"pid": p.pid, "rank": int(e["SLURM_PROCID"]), "step": int(e["SLURM_STEP_ID"]),
                          "node": e["SLURMD_NODENAME"], "proc": p})
    return found


def _alive(pids) -> bool:
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # gone, also between a look-up and the next
            return False
    return any(running(pid) for pid in pids)


def _wait(what: str, cond, timeout: float, cluster, job: str, out: Path, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        info = job_info(cluster, job)
        assert info.get("JobState") in ("PENDING", "RUNNING"), f"{what}: job {info.get('JobState')}\n" + \
            diagnostics(cluster, out)
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s\n" + diagnostics(cluster, out)
        time.sleep(every)


def _step_ranks(run_dir: Path, step: int, world: int, cluster, job: str, out: Path, timeout: float = 120):
    """All `world` ranks of job step `step`, once they run."""
    def ready():
        ranks = [r for r in _ranks(run_dir) if r["step"] == step]
        return ranks if len(ranks) == world else None
    return sorted(_wait(f"{world} ranks of step {step}", ready, timeout, cluster, job, out), key=lambda r: r["rank"])


def _after_train_step(run_dir: Path, step: int, cluster, job: str, out: Path, timeout: float = 180):
    """Wait until train step `step` (or a later one) is logged."""
    _wait(f"train step {step}", lambda: any(r["step"] >= step for r in _records(run_dir)), timeout, cluster, job,
          out)


def _kill(rank: dict, sig=signal.SIGKILL) -> float:
    os.kill(rank["pid"], sig)
    return time.time()


def _measure_restart(run_dir: Path, old_pids: list[int], t_kill: float, cluster, job: str, out: Path) -> dict:
    """Seconds from the kill to the end of the killed step (every rank of it gone) and to the first train
    record written after the kill (the relaunched step training again)."""
    _wait("end of the killed step", lambda: not _alive(old_pids), 60, cluster, job, out, every=0.05)
    t_end = time.time()
    first = _wait("training again", lambda: [r for r in _records(run_dir) if r["time"] > t_kill], 180, cluster, job,
                  out, every=0.2)
    return {"step_end": t_end - t_kill, "training_again": first[0]["time"] - t_kill, "first_new_step": first[0]["step"]}


def _nodes(cluster, nodelist: str) -> list[str]:
    return cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


def test_dead_rank_step_relaunched_in_same_allocation(slurm, tmp_path):
    # 4 nodes x 1 rank, 512 samples / 4 ranks / batch 8 = 16 steps, a checkpoint every 4 steps. Rank 2 is
    # killed after step 6: srun ends the step, the batch script relaunches it (no requeue: same job id,
    # restart count 0) and the ranks resume from the checkpoint of step 4.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, ["--nodes=4", "--output", str(out), TEMPLATE, *TINY, "--synthetic-size", "512",
                         "--checkpoint-every", "4", "--run-dir", str(run_dir)], HPCTRAIN_SITE="testcluster")
    ranks = _step_ranks(run_dir, 0, 4, slurm, job, out)
    _after_train_step(run_dir, 6, slurm, job, out)
    victim = ranks[2]
    t_kill = _kill(victim)
    times = _measure_restart(run_dir, [r["pid"] for r in ranks], t_kill, slurm, job, out)
    info = wait_for_job(slurm, job, timeout=300, output=out)
    t_done = time.time()
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), diagnostics(slurm, out)
    assert text.count("restart 0 on 4 node(s)") == 1 and "requeueing" not in text  # sourced once: no requeue

    lines = RESTART_LINE.findall(text)
    assert len(lines) == 1, text[-3000:]
    k, most, code, cause, blamed, excluded, saved, trained, lost = lines[0]
    assert (k, most) == ("1", "2") and cause == f"{victim['node']}: task 2: Killed", lines
    assert blamed == victim["node"] and excluded == "none", lines  # no spare node: same nodes again
    assert int(code) in (137, 143)  # srun's status: the worst of the killed rank and those srun ended
    assert saved.isdigit() and int(saved) % 4 == 0 and int(trained) >= 6 and int(lost) == int(trained) - int(saved)
    assert f"resumed from {run_dir / 'checkpoints' / f'ckpt-{int(saved):08d}.pt'} at step {saved}" in text
    assert times["first_new_step"] == int(saved) + 1
    # Every step exactly once in metrics.jsonl (the resumed run drops the records it redoes), one final line.
    assert [r["step"] for r in _records(run_dir)] == list(range(1, 17)) and text.count("done at step 16") == 1
    print(f"\nkill -9 rank 2 of 4 at step {trained}: -> step ended {times['step_end']:.1f} s, -> training again "
          f"{times['training_again']:.1f} s (step {times['first_new_step']}), steps lost {lost} (checkpoint step "
          f"{saved}), -> job COMPLETED {t_done - t_kill:.1f} s", file=sys.stderr)


def test_restart_limit_and_fast_step_end(slurm, tmp_path):
    # 2 nodes, HPCTRAIN_MAX_RESTARTS=1. Rank 1 is killed, the step ends within seconds (--kill-on-bad-exit:
    # rank 0 would otherwise wait in its allreduce) and is relaunched; then rank 0 of the relaunched step is
    # killed: no restart left, the job fails with one summary line naming both blamed nodes.
    # 2048 samples / 2 ranks / batch 8 = 128 steps: the job cannot finish before the second kill.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, ["--nodes=2", "--output", str(out), TEMPLATE, *TINY, "--synthetic-size", "2048",
                         "--checkpoint-every", "3", "--run-dir", str(run_dir)],
                 HPCTRAIN_SITE="testcluster", HPCTRAIN_MAX_RESTARTS="1")
    first = _step_ranks(run_dir, 0, 2, slurm, job, out)
    _after_train_step(run_dir, 4, slurm, job, out)
    t_kill1 = _kill(first[1])
    times = _measure_restart(run_dir, [r["pid"] for r in first], t_kill1, slurm, job, out)
    assert times["step_end"] < 60, times

    second = _step_ranks(run_dir, 1, 2, slurm, job, out)
    t_kill2 = _kill(second[0])  # rank 0: the run-dir lock holder dies too; the lock was released or taken over
    _wait("end of the second step", lambda: not _alive([r["pid"] for r in second]), 60, slurm, job, out, every=0.05)
    step_end2 = time.time() - t_kill2
    info = wait_for_job(slurm, job, timeout=60, output=out)
    job_end = time.time() - t_kill2
    text = out.read_text()
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), diagnostics(slurm, out)
    assert info["ExitCode"] in ("137:0", "143:0"), info["ExitCode"]
    assert len(RESTART_LINE.findall(text)) == 1, text[-3000:]
    blamed = ",".join(sorted({first[1]["node"], second[0]["node"]}))
    summary = [ln for ln in text.splitlines() if ln.startswith("hpctrain: giving up")]
    assert summary == [f"hpctrain: giving up after 1 restart(s) in the same allocation (HPCTRAIN_MAX_RESTARTS=1): last "
                       f"step exit {info['ExitCode'].split(':')[0]} ({second[0]['node']}: task 0: Killed); blamed "
                       f"node(s) {blamed}"], summary
    assert step_end2 < 60
    print(f"\nkill -9 rank 1 of 2: -> step ended {times['step_end']:.1f} s, -> training again "
          f"{times['training_again']:.1f} s; kill -9 rank 0 of the relaunched step: -> step ended {step_end2:.1f} s, "
          f"-> job FAILED {job_end:.1f} s", file=sys.stderr)


def test_spare_node_replaces_blamed_node(slurm, tmp_path):
    # 5 nodes, HPCTRAIN_SPARE_NODES=1: the step runs on 4 of them; after rank 1 is killed the relaunch
    # excludes rank 1's node and runs on the other 3 plus the spare. 512 samples / 4 / 8 = 16 steps.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, ["--nodes=5", "--output", str(out), TEMPLATE, *TINY, "--synthetic-size", "512",
                         "--checkpoint-every", "3", "--run-dir", str(run_dir)],
                 HPCTRAIN_SITE="testcluster", HPCTRAIN_SPARE_NODES="1")
    first = _step_ranks(run_dir, 0, 4, slurm, job, out)
    allocated = _nodes(slurm, job_info(slurm, job)["NodeList"])
    assert len(allocated) == 5 and len({r["node"] for r in first}) == 4
    spare = set(allocated) - {r["node"] for r in first}
    _after_train_step(run_dir, 4, slurm, job, out)
    victim = first[1]
    t_kill = _kill(victim)
    times = _measure_restart(run_dir, [r["pid"] for r in first], t_kill, slurm, job, out)
    second = _step_ranks(run_dir, 1, 4, slurm, job, out)
    step = slurm.run("scontrol", "show", "step", f"{job}.1").stdout
    step_nodes = _nodes(slurm, step.split("NodeList=")[1].split()[0])
    info = wait_for_job(slurm, job, timeout=300, output=out)
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), diagnostics(slurm, out)
    lines = RESTART_LINE.findall(text)
    assert len(lines) == 1 and lines[0][4:6] == (victim["node"], victim["node"]), lines  # blamed, excluded
    assert sorted({r["node"] for r in second}) == sorted(step_nodes) == sorted(set(allocated) - {victim["node"]})
    assert spare <= set(step_nodes)
    assert text.count("slurm launcher, 4 rank(s) on 4 node(s)") == 2
    assert [r["step"] for r in _records(run_dir)] == list(range(1, 17)) and text.count("done at step 16") == 1
    print(f"\nspare node: killed rank 1 on {victim['node']}, relaunched on {','.join(step_nodes)} (spare "
          f"{','.join(spare)}): -> step ended {times['step_end']:.1f} s, -> training again "
          f"{times['training_again']:.1f} s", file=sys.stderr)


def _has_hang_timeout() -> bool:
    p = subprocess.run([sys.executable, "-m", "hpctrain.resnet", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    return "--hang-timeout" in p.stdout


def test_frozen_rank_blamed_through_hang_watchdog(slurm, tmp_path):
    # SIGSTOP rank 1 of 2: rank 0's hang watchdog fires (exit 86, one line naming its node), srun ends the
    # step; the node that printed nothing (the frozen rank's) is blamed and the step is relaunched there
    # (no spare), resumes and completes. 512 samples / 2 / 8 = 32 steps.
    if not _has_hang_timeout():
        pytest.skip("python -m hpctrain.resnet has no --hang-timeout yet")
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, ["--nodes=2", "--output", str(out), TEMPLATE, *TINY, "--synthetic-size", "512",
                         "--checkpoint-every", "4", "--hang-timeout", "20", "--run-dir", str(run_dir)],
                 HPCTRAIN_SITE="testcluster")
    first = _step_ranks(run_dir, 0, 2, slurm, job, out)
    _after_train_step(run_dir, 6, slurm, job, out)
    frozen = first[1]
    t_stop = _kill(frozen, signal.SIGSTOP)
    times = _measure_restart(run_dir, [r["pid"] for r in first], t_stop, slurm, job, out)
    info = wait_for_job(slurm, job, timeout=300, output=out)
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), diagnostics(slurm, out)
    assert f"rank 0 on node {first[0]['node']}: no progress for" in text
    assert f"rank 1 on node {frozen['node']}: no progress for" not in text
    lines = RESTART_LINE.findall(text)
    assert len(lines) == 1, text[-3000:]
    k, most, code, cause, blamed, excluded, saved, trained, lost = lines[0]
    assert code == "86" and cause.startswith("hang watchdog: ") and blamed == frozen["node"] and excluded == "none"
    assert [r["step"] for r in _records(run_dir)] == list(range(1, 33)) and text.count("done at step 32") == 1
    print(f"\nSIGSTOP rank 1 of 2 (--hang-timeout 20): -> step ended {times['step_end']:.1f} s, -> training again "
          f"{times['training_again']:.1f} s, steps lost {lost}", file=sys.stderr)


FAKE_STEP = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --requeue --open-mode=append
source "$HPCTRAIN_ROOT/slurm/env.sh" || exit 2
# HPCTRAIN_PYTHON=bash: the "training module" is this bash snippet, one per rank.
hpctrain_step -c '
  echo "step: rank $SLURM_PROCID restart ${SLURM_RESTART_COUNT:-0}"
  [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && exit 0
  case $MODE in
    # An agreed stop whose rank 0 is slow: srun ends it on the first exit 85 (--kill-on-bad-exit).
    preempt) [ "$SLURM_PROCID" = 0 ] && { trap - TERM; sleep 30; }; exit 85 ;;
    save-failed) exit 87 ;;
  esac'
"""


@pytest.mark.parametrize("mode", ["preempt", "save-failed"])
def test_step_code_is_the_first_failed_task(slurm, tmp_path, mode):
    # srun's own status is the worst task's; the batch script goes by the first failed task instead. A
    # stand-in step (bash, no training): "preempt" has rank 1 exit 85 at once while rank 0 is still busy,
    # so srun terminates rank 0 and returns 143, and the job must still be requeued (and then complete);
    # "save-failed" (87 on every rank) must end the job with 87 and no relaunch.
    script = tmp_path / "fake.sh"
    script.write_text(FAKE_STEP)
    out = tmp_path / "fake.out"
    job = sbatch(slurm, ["--output", str(out), str(script)], cwd=tmp_path, HPCTRAIN_ROOT=str(ROOT),
                 HPCTRAIN_SITE="testcluster", HPCTRAIN_PYTHON="bash", MODE=mode)
    info = wait_for_job(slurm, job, timeout=120, output=out)
    text = out.read_text()
    if mode == "preempt":
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
        first = text.index("srun: error: node2: task 1: Exited with exit code 85")
        assert text.index("srun: error: node1: task 0: Terminated") > first, text
        assert f"step stopped on a signal with a checkpoint saved (exit 85): requeueing job {job}" in text
        assert "step: rank 0 restart 1" in text and "in the same allocation" not in text
    else:
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "87:0", "0"), text
        assert "hpctrain: step exit 87 (node" in text and "not restarting, a relaunch would fail the same way" in text
        assert "in the same allocation" not in text and "requeueing" not in text
