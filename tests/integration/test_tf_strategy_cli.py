"""`--framework tf --backend multiworker|mirrored` end to end: the same CLI, data, checkpoints, stop path and
one-line errors as `--backend horovod`."""
import json
import re
import signal
import socket

import pytest

from hpctrain.errors import EXIT_PREEMPTED
from tests.integration.test_bad_input import ERROR_LINE
from tests.launch import check_ok, finish, metrics, run, signal_ranks, start, trained, wait_for

TF = ["-m", "hpctrain.resnet", "--framework", "tf"]
ABSL = re.compile(r"[EIWF]\d{4} ")  # TensorFlow's own start-up log lines (e.g. "CUDA error: ..." on CPU machines)


def test_multiworker_learns_is_preempted_and_resumes_without_losing_a_step(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TF, "--backend", "multiworker", "--config", "configs/demo.toml", "--run-dir", str(run_dir),
            "--max-steps", "24", "--log-every", "1", "--preempt-check-every", "2", "--eval-every-epoch", "false",
            "--resume", "auto"]
    job = start(2, args)
    assert wait_for(lambda: trained(run_dir, 6), 240), finish(job, 5)[-3000:]
    assert signal_ranks(job, signal.SIGUSR1) == 2
    out = finish(job)
    assert job.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = metrics(run_dir, "train")[-1]["step"]
    assert f"stopped at step {stopped} on SIGUSR1, checkpoint saved" in out
    assert (run_dir / "checkpoints" / f"ckpt-{stopped:08d}.npz").exists()
    assert "multiworker backend" in out and "batch 32 per replica x 2 replica(s) x 1 micro-batch(es) = 64 global" in out

    out = check_ok(run("mpirun", 2, args, timeout=400))
    assert "resumed from" in out and f"at step {stopped}" in out
    steps = [r["step"] for r in metrics(run_dir, "train")]
    assert steps == list(range(1, 25)), steps  # none lost, none repeated
    losses = [r["loss"] for r in metrics(run_dir, "train")]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses  # the built-in shapes are learnable


def test_mirrored_two_cpu_devices_trains_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TF, "--backend", "mirrored", "--cpu-devices", "2", "--config", "configs/tiny.toml",
            "--synthetic-size", "128", "--run-dir", str(run_dir), "--checkpoint-every", "2"]
    out = check_ok(run("single", 1, [*args, "--max-steps", "2"], timeout=300))
    assert "mirrored backend, device 2 x CPU" in out and "= 16 global" in out
    out = check_ok(run("single", 1, args, timeout=300))  # 128 / (8 x 2) = 8 steps
    assert "at step 2" in out
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 9))
    assert metrics(run_dir, "eval")[-1]["val_samples"] > 0


def held_port():
    s = socket.socket()
    s.bind(("", 0))
    s.listen()
    return s, s.getsockname()[1]


BAD_TF_CONFIG = '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}'
THREE_WORKERS = json.dumps({"cluster": {"worker": ["localhost:23001", "localhost:23002", "localhost:23003"]},
                            "task": {"type": "worker", "index": 0}})
ERRORS = [
    ("single", ["--backend", "multiworker"], None, "one worker and no TF_CONFIG; launch one process per node or GPU"),
    ("single", ["--backend", "multiworker"], BAD_TF_CONFIG, "TF_CONFIG: not JSON"),
    ("mpirun", ["--backend", "multiworker"], THREE_WORKERS, "TF_CONFIG: task is rank 0 of 3"),
    ("mpirun", ["--backend", "mirrored"], None, "'mirrored' runs one process, but the launcher started 2 ranks"),
    ("mpirun", ["--backend", "multiworker", "--port-base", "PORT"], None, "port PORT of worker 0 (localhost) is "
                                                                          "already in use; move the workers' ports "
                                                                          "with --port-base"),
    ("single", ["--backend", "mirrored", "--collective", "nccl"], None, "'nccl' needs GPUs"),
]


@pytest.mark.parametrize("launcher, argv, tf_config, words", ERRORS,
                         ids=[" ".join(e[1]) + (" TF_CONFIG" if e[2] else "") for e in ERRORS])
def test_strategy_errors_are_one_line_exit_2(tmp_path, launcher, argv, tf_config, words):
    sock, port = held_port()
    try:
        argv = [str(port) if a == "PORT" else a for a in argv]
        p = run(launcher, 1 if launcher == "single" else 2,
                [*TF, "--config", "configs/tiny.toml", "--run-dir", str(tmp_path / "run"), *argv], timeout=180,
                extra_env={"TF_CONFIG": tf_config} if tf_config else None)
    finally:
        sock.close()
    output = p.stdout + p.stderr
    errors = [line for line in output.splitlines() if ERROR_LINE.search(line) and not ABSL.match(line)]
    assert p.returncode == 2, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert words.replace("PORT", str(port)) in errors[0], errors[0]
    assert "Traceback" not in output
