"""A frozen rank (SIGSTOP) and a dead rank (kill -9) end the job promptly; a slow but healthy run does not
trip the hang watchdog. Real launchers, real signals."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from hpctrain import rundir
from hpctrain.errors import EXIT_HANG
from tests.launch import ROOT, check_ok, env, finish, run, signal_ranks, slow_fsync, start, trained, wait_for

TINY = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--synthetic-size", "8192",
        "--eval-every-epoch", "false"]
TIMEOUT = 5


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_frozen_rank_fires_the_watchdog_and_ends_the_job(tmp_path, launcher):
    run_dir = tmp_path / "run"
    job = start(2, [*TINY, "--run-dir", str(run_dir), "--hang-timeout", str(TIMEOUT)], launcher=launcher)
    try:
        assert wait_for(lambda: trained(run_dir, 3), 180), finish(job, 5)[-3000:]
        assert signal_ranks(job, signal.SIGSTOP, rank=1) == 1
        frozen = time.monotonic()
        out = finish(job, TIMEOUT + 60)
        ended = time.monotonic() - frozen
    finally:
        signal_ranks(job, signal.SIGKILL) if job.poll() is None else None
    assert job.returncode == EXIT_HANG, out[-3000:]
    assert ended < TIMEOUT + 30, f"job ended {ended:.1f} s after the freeze"
    lines = [line for line in out.splitlines() if "no progress for" in line]
    assert len(lines) == 1 and "rank 0 on node" in lines[0] and "exiting 86" in lines[0], out[-3000:]
    report = (run_dir / "hang-0.txt").read_text()
    assert report.startswith("hpctrain: rank 0 on node") and "most recent call first" in report
    assert "hpctrain/engine/torch/" in report  # the main thread's stack: where it waits
    assert not (run_dir / "hang-1.txt").exists()  # the frozen rank never blames the others
    hang = json.loads((run_dir / "hang-0.json").read_text())  # what the Slurm supervisor reads
    assert hang["rank"] == 0 and hang["node"] and hang["step"] >= 3 and hang["seconds"] >= TIMEOUT
    status = rundir.read_status(run_dir)
    assert (status["state"], status["exit_code"]) == ("failed", EXIT_HANG) and "no progress for" in status["reason"]
    print(f"\n{launcher}: SIGSTOP -> job end {ended:.1f} s (hang timeout {TIMEOUT} s)", file=sys.stderr)


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_killed_rank_ends_the_job_within_a_minute(tmp_path, launcher):
    run_dir = tmp_path / "run"
    job = start(2, [*TINY, "--run-dir", str(run_dir)], launcher=launcher)
    try:
        assert wait_for(lambda: trained(run_dir, 3), 180), finish(job, 5)[-3000:]
        assert signal_ranks(job, signal.SIGKILL, rank=1) == 1
        killed = time.monotonic()
        out = finish(job, 90)
        ended = time.monotonic() - killed
    finally:
        signal_ranks(job, signal.SIGKILL) if job.poll() is None else None
    assert job.returncode != 0, out[-3000:]
    assert ended < 60, f"job ended {ended:.1f} s after kill -9"
    print(f"\n{launcher}: kill -9 -> job end {ended:.1f} s", file=sys.stderr)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "SIGSTOP"])
def test_a_lost_parameter_server_ends_the_job(tmp_path, sig):
    # --sync ps on 3 ranks: the server is rank 2; the workers wait for its reply in an MPI receive (the GIL
    # released): kill -9 -> the launcher ends the job; frozen -> the workers' watchdogs fire (exit 86).
    run_dir = tmp_path / "run"
    job = start(3, [*TINY, "--sync", "ps", "--backend", "mpi", "--run-dir", str(run_dir), "--hang-timeout",
                    str(TIMEOUT)])
    try:
        assert wait_for(lambda: trained(run_dir, 3), 180), finish(job, 5)[-3000:]
        assert signal_ranks(job, sig, rank=2) == 1
        lost = time.monotonic()
        out = finish(job, TIMEOUT + 90)
        ended = time.monotonic() - lost
    finally:
        signal_ranks(job, signal.SIGKILL) if job.poll() is None else None
    assert job.returncode != 0 and ended < TIMEOUT + 30, (ended, out[-3000:])
    if sig == signal.SIGSTOP:
        # Both workers wait for the frozen server: whichever watchdog fires first ends the job (mpirun aborts the
        # rest), so the line may come from either; never from the server, which cannot run.
        assert job.returncode == EXIT_HANG and re.search(r"rank [01] on node \S+: no progress for", out), out[-3000:]
        assert not re.search(r"rank 2 on node \S+: no progress for", out), out[-3000:]
    print(f"\nparameter server {sig.name} -> job end {ended:.1f} s", file=sys.stderr)


def test_no_false_alarm_for_slow_checkpoints_and_long_evaluations(tmp_path):
    # A 3 s hang timeout; rank 0's every fsync held 1.5 s (a checkpoint takes ~6 s, each log window's status update
    # 3 s: written in the background, the ranks train on), an evaluation of 128 single-image batches per rank
    # (several seconds in all): long phases, but progress throughout.
    run_dir = tmp_path / "run"
    args = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--run-dir", str(run_dir), "--hang-timeout",
            "3", "--synthetic-size", "2048", "--batch-size", "64", "--eval-batch-size", "1", "--checkpoint-every", "8",
            "--log-every", "4"]
    job = start(2, args, wrap=slow_fsync(1_500_000))
    out = finish(job, 300)
    assert job.returncode == 0, out[-3000:]
    assert not list(run_dir.glob("hang-*.txt")) and "no progress" not in out
    assert "val_top1" in out and "saved checkpoint" in out


WATCHDOG = """
import sys, time
from hpctrain import watchdog
w = watchdog.start({timeout}, sys.argv[1], 0, "n1", startup=1.0)
{body}
print("survived", flush=True)
"""


@pytest.mark.parametrize("body, fires", [
    # steady 0.1 s steps, then silence: fires after the timeout
    ("for s in range(5):\n    time.sleep(0.1); watchdog.beat(s)\ntime.sleep(3)", True),
    # 0.6 s steps: the limit grows to 3 x 0.6 = 1.8 s, so a 1.2 s step is no hang
    ("for s in range(4):\n    time.sleep(0.6); watchdog.beat(s)\ntime.sleep(1.2); watchdog.beat(9)", False),
    # a phase may take 6 x the timeout, and start-up counts as one
    ("time.sleep(1.0)\nwatchdog.beat(1)\nwith watchdog.phase('checkpoint'):\n    time.sleep(1.5)\n"
     "watchdog.beat(2)", False),
    # a phase longer than that fires
    ("watchdog.beat(1)\nwith watchdog.phase('checkpoint'):\n    time.sleep(4)", True),
    # start-up allows 6 x 0.5 s, but rank 0 waiting in a start-up collective only startup = 1 s
    ("time.sleep(2.0)\nwith watchdog.collective('horovod start-up'):\n    time.sleep(0.5)\nwatchdog.beat(1)", False),
    ("with watchdog.collective('horovod start-up'):\n    time.sleep(2.5)", True),
], ids=["silence", "slow-steps", "phases", "phase-too-long", "startup-collective", "startup-collective-too-long"])
def test_watchdog_limits(tmp_path, body, fires):
    code = WATCHDOG.format(timeout=0.5, body=body)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=60)
    if fires:
        assert p.returncode == EXIT_HANG and "survived" not in p.stdout, p.stdout + p.stderr
        assert "rank 0 on node n1: no progress for" in p.stderr and (tmp_path / "hang-0.txt").exists()
        if "collective" in body:
            assert "waiting in the start-up collective 'horovod start-up'" in p.stderr, p.stderr
    else:
        assert p.returncode == 0 and "survived" in p.stdout, p.stdout + p.stderr


def test_a_peer_that_never_comes_ends_the_start_up_within_its_bound(tmp_path):
    # Rank 1 stops itself before Python starts (a missing peer, or a transport that hangs the first collective):
    # rank 0 waits in Horovod's start-up. The start-up allowance would be 6 x 300 s; --startup-timeout 8 ends it.
    run_dir = tmp_path / "run"
    stall = 'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then kill -STOP $$; fi; exec "$@"'
    t0 = time.monotonic()
    job = start(2, [*TINY, "--run-dir", str(run_dir), "--startup-timeout", "8"], wrap=stall)
    out = finish(job, 120)
    took = time.monotonic() - t0
    assert job.returncode == EXIT_HANG, out[-3000:]
    assert "rank 0 on node" in out and "waiting in the start-up collective 'horovod start-up'" in out, out[-3000:]
    assert took < 8 + 40, f"{took:.0f} s"
    hang = json.loads((run_dir / "hang-0.json").read_text())
    assert hang["collective"] == "horovod start-up" and hang["seconds"] >= 8
    print(f"\nstart-up collective stall -> exit 86 after {took:.1f} s (startup timeout 8 s)", file=sys.stderr)


def test_hang_timeout_zero_is_off_and_negative_is_refused(tmp_path):
    out = check_ok(run("single", 1, [*TINY, "--backend", "none", "--run-dir", str(tmp_path / "r"), "--max-steps", "2",
                                     "--hang-timeout", "0"]))
    assert "done at step 2" in out
    p = run("single", 1, [*TINY, "--backend", "none", "--hang-timeout", "-1"])
    assert p.returncode == 2 and "run.hang_timeout (--hang-timeout): -1.0 is below the minimum 0.0" in p.stderr


def test_backstop_fires_when_the_main_thread_holds_the_gil(tmp_path):
    # A main thread stuck in C code that holds the GIL (here: a regex with catastrophic backtracking)
    # starves our watchdog thread; faulthandler's C thread still dumps the stacks and ends the process.
    code = WATCHDOG.format(timeout=0.5, body="watchdog.beat(1)\nimport re\nre.match(r'(a+)+$', 'a' * 40 + 'b')")
    began = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "survived" not in p.stdout
    assert "Timeout" in p.stderr and "most recent call first" in p.stderr, p.stderr[-2000:]
    assert time.monotonic() - began < 30
