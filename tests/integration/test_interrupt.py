"""Ctrl-C: SIGINT to the launcher's process group, as a terminal sends it. mpirun (also under horovodrun) answers
it with SIGCONT to every rank at once, then SIGTERM and SIGKILL each `odls_base_sigkill_timeout` seconds later;
hpctrain takes the SIGCONT as a stop request: the ranks agree on a step, save, and exit 85 before the kill. The
resumed run is exact. A second Ctrl-C ends the job at once, leaving no process behind."""
import os
import signal
import time

import psutil
import pytest

from hpctrain import rundir
from tests.integration.test_faults import _verified
from tests.launch import check_ok, finish, metrics, run, start, trained, wait_for

TINY = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml"]
# 128 samples / 2 ranks / batch 8 = 8 steps per epoch, 4 epochs; every step checks for a stop.
COMMON = [*TINY, "--synthetic-size", "128", "--epochs", "4", "--preempt-check-every", "1", "--deterministic",
          "--eval-every-epoch", "false"]
GRACE = {"OMPI_MCA_odls_base_sigkill_timeout": "5"}  # what README asks of mpirun users (Open MPI's default: 1 s)


def _job_processes(run_dir) -> list:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(run_dir) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    check_ok(run("mpirun", 2, [*COMMON, "--run-dir", str(d)]))
    return {r["step"]: r["loss"] for r in metrics(d, "train")}


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_ctrl_c_saves_and_the_resumed_run_is_exact(tmp_path, launcher, reference):
    d = tmp_path / "run"
    job = start(2, [*COMMON, "--run-dir", str(d)], launcher=launcher, extra_env=GRACE, new_session=True)
    assert wait_for(lambda: trained(d, 3), 180), finish(job, 5)[-3000:]
    os.killpg(job.pid, signal.SIGINT)
    out = finish(job, 60)
    stopped = metrics(d, "train")[-1]["step"]
    assert stopped < 32, out[-3000:]
    assert f"stopped at step {stopped} on SIGCONT from the launcher" in out, out[-3000:]
    assert "exit 85 (requeue or rerun the same command to resume)" in out
    assert _verified(d / "checkpoints" / f"ckpt-{stopped:08d}.pt")
    status = rundir.read_status(d)
    assert (status["state"], status["exit_code"], status["checkpoint_step"], status["step"]) == \
        ("stopped", 85, stopped, stopped)
    check_ok(run(launcher, 2, [*COMMON, "--run-dir", str(d)]))
    resumed = {r["step"]: r["loss"] for r in metrics(d, "train")}
    assert sorted(resumed) == list(range(1, 33))  # no step lost or repeated
    assert [resumed[s] for s in range(stopped + 1, 33)] == pytest.approx(
        [reference[s] for s in range(stopped + 1, 33)], rel=1e-6, abs=1e-7)


def test_a_second_ctrl_c_ends_the_job_at_once_with_no_process_left(tmp_path):
    d = tmp_path / "run"
    job = start(2, [*COMMON, "--run-dir", str(d), "--epochs", "50"],
                extra_env={"OMPI_MCA_odls_base_sigkill_timeout": "60"}, new_session=True)
    assert wait_for(lambda: trained(d, 1), 180), finish(job, 5)[-3000:]
    os.killpg(job.pid, signal.SIGINT)
    time.sleep(0.5)
    t0 = time.monotonic()
    os.killpg(job.pid, signal.SIGINT)
    finish(job, 30)
    took = time.monotonic() - t0
    assert took < 10, f"the second Ctrl-C took {took:.1f} s"
    assert wait_for(lambda: not _job_processes(d), 10), [p.info["cmdline"] for p in _job_processes(d)]
