"""hpctrain.runlock with real processes: a live holder in another process, a SIGKILLed holder (reaped
and zombie), a reused pid, a holder on another host, the heartbeat, release, and two processes racing
to take over one stale lock."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpctrain.errors import UserError
from hpctrain.runlock import LOCK_NAME, RunLock, RunLockError, process_start_time

ROOT = Path(__file__).resolve().parents[2]

# Takes the lock on argv[1], says so, and holds it until stdin closes.
HOLDER = """
import sys
from hpctrain.runlock import RunLock
lock = RunLock(sys.argv[1], job_id="4711", heartbeat=0.2).acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""

# Per stdin line "go <dir> <t0>": at time t0 try the lock, answer "won" or "lost <message>";
# per line "release": release, answer "released". Log lines are prefixed "LOG".
CONTENDER = """
import sys, time
from hpctrain.runlock import RunLock, RunLockError
lock = None
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "go":
        lock = RunLock(args[0], log=lambda m: print("LOG", m, flush=True))
        while time.time() < float(args[1]):
            pass
        try:
            lock.acquire()
            print("won", flush=True)
        except RunLockError as e:
            print("lost", e, flush=True)
    else:
        lock.release()
        print("released", flush=True)
"""


def _python(code: str, *args, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, text=True, cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)


def _start_holder(run_dir) -> subprocess.Popen:
    p = _python(HOLDER, run_dir)
    assert p.stdout.readline().strip() == "locked"
    return p


def _write_lock(run_dir: Path, **fields) -> Path:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
              "job_id": "99", "token": "someone-else", "started": time.time(), **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_run_is_refused_with_one_line_until_the_first_releases(tmp_path):
    run_dir = tmp_path / "new" / "run"  # created by the lock
    holder = _start_holder(run_dir)
    try:
        with pytest.raises(RunLockError) as err:
            RunLock(run_dir).acquire()
        msg = str(err.value)
        assert isinstance(err.value, UserError) and "\n" not in msg
        for part in (str(run_dir), socket.gethostname(), f"pid {holder.pid}", "job 4711", "--run-dir"):
            assert part in msg
    finally:
        holder.stdin.close()
        assert holder.wait(10) == 0
    assert not (run_dir / LOCK_NAME).exists()
    with RunLock(run_dir) as lock:
        assert lock.held and json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.held and not lock.path.exists()
    lock.release()  # idempotent


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_lock_of_sigkilled_holder_is_taken_over_and_logged(tmp_path, reaped):
    holder = _start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    if reaped:
        holder.wait()
    else:  # killed but not yet waited for by its parent: still in the process table
        deadline = time.monotonic() + 5
        while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert (tmp_path / LOCK_NAME).exists()
    logs = []
    with RunLock(tmp_path, log=logs.append):
        pass
    holder.wait()
    assert len(logs) == 1 and "taking over stale lock" in logs[0]
    assert f"pid {holder.pid}" in logs[0] and "(job 4711)" in logs[0] and "not running" in logs[0]


def test_pid_alive_with_other_start_time_is_a_reused_pid(tmp_path):
    _write_lock(tmp_path, pid_start=process_start_time(os.getpid()) - 1)
    logs = []
    with RunLock(tmp_path, log=logs.append):
        pass
    assert len(logs) == 1 and "now belongs to another process" in logs[0]


def test_live_same_host_holder_is_respected_even_without_heartbeat(tmp_path):
    _age(_write_lock(tmp_path), 3600)  # this very process holds it: alive, same start time
    with pytest.raises(RunLockError):
        RunLock(tmp_path).acquire()


def test_other_host_is_respected_while_fresh_and_taken_over_after_stale_after(tmp_path):
    path = _write_lock(tmp_path, host="node-gone-17", pid=12345, job_id="777")
    with pytest.raises(RunLockError, match=r"host node-gone-17, pid 12345, Slurm job 777"):
        RunLock(tmp_path, stale_after=120).acquire()
    _age(path, 121)
    logs = []
    with RunLock(tmp_path, stale_after=120, log=logs.append):
        pass
    assert len(logs) == 1 and "host node-gone-17 pid 12345 (job 777)" in logs[0] and "no heartbeat" in logs[0]


def test_lock_of_the_run_before_a_requeue_is_taken_over_at_once(tmp_path):
    # Same Slurm job, earlier incarnation, on another node, heartbeat still fresh: Slurm has ended it.
    _write_lock(tmp_path, host="node-gone-17", pid=12345, job_id="777", restart=0)
    with pytest.raises(RunLockError, match="Slurm job 777"):  # the same incarnation: a live second step
        RunLock(tmp_path, job_id="777", restart=0).acquire()
    with pytest.raises(RunLockError, match="Slurm job 777"):  # another job
        RunLock(tmp_path, job_id="778", restart=1).acquire()
    logs = []
    with RunLock(tmp_path, job_id="777", restart=1, log=logs.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["restart"] == 1
    assert len(logs) == 1 and "an earlier run of Slurm job 777" in logs[0]


def test_lock_of_the_step_before_a_relaunch_in_the_allocation_is_taken_over(tmp_path):
    _write_lock(tmp_path, host="node-gone-17", pid=12345, job_id="777", restart=0, step=0)
    with pytest.raises(RunLockError, match="Slurm job 777"):  # the same step: a live rank 0 elsewhere
        RunLock(tmp_path, job_id="777", restart=0, step=0).acquire()
    logs = []
    with RunLock(tmp_path, job_id="777", restart=0, step=1, log=logs.append):
        pass
    assert len(logs) == 1 and "restart 0, step 0" in logs[0]


def test_unreadable_lock_counts_as_held_while_fresh_and_stale_when_old(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text('{"host": "no')  # its writer died between create and write
    with pytest.raises(RunLockError, match="in use"):
        RunLock(tmp_path).acquire()
    _age(path, 60)
    logs = []
    with RunLock(tmp_path, log=logs.append):
        pass
    assert len(logs) == 1 and "unreadable" in logs[0]


def test_heartbeat_refreshes_mtime_and_stops_on_release(tmp_path):
    lock = RunLock(tmp_path, heartbeat=0.2).acquire()
    try:
        _age(lock.path, 1000)
        deadline = time.monotonic() + 5
        while lock.path.stat().st_mtime < time.time() - 100:
            assert time.monotonic() < deadline, "heartbeat did not touch the lock file"
            time.sleep(0.05)
        beat = lock._beat
    finally:
        lock.release()
    assert not beat.is_alive()


def test_release_keeps_a_lock_that_someone_else_holds_now(tmp_path):
    lock = RunLock(tmp_path).acquire()
    _write_lock(tmp_path, token="new-holder")
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == "new-holder"


def test_two_processes_racing_for_one_stale_lock_exactly_one_wins(tmp_path):
    contenders = [_python(CONTENDER) for _ in range(2)]
    dead = _dead_pid()
    try:
        for round_ in range(8):
            run_dir = tmp_path / str(round_)
            run_dir.mkdir()
            if round_ % 2:
                _write_lock(run_dir, pid=dead)
            else:
                _age(_write_lock(run_dir, host="node-gone-17", pid=12345), 1000)
            t0 = time.time() + 0.3
            for c in contenders:
                c.stdin.write(f"go {run_dir} {t0}\n")
                c.stdin.flush()
            answers, logs = [], []
            for c in contenders:
                while (line := c.stdout.readline().strip()).startswith("LOG"):
                    logs.append(line)
                answers.append(line)
            winners = [c for c, a in zip(contenders, answers) if a == "won"]
            assert len(winners) == 1, answers
            loser_msg = next(a for a in answers if a != "won")
            assert loser_msg.startswith("lost") and f"pid {winners[0].pid}" in loser_msg
            assert len(logs) == 1, logs  # the stale file was moved away exactly once
            assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == winners[0].pid
            for c in contenders:
                c.stdin.write("release\n")
                c.stdin.flush()
                assert c.stdout.readline().strip() == "released"
    finally:
        for c in contenders:
            c.stdin.close()
            c.wait(10)


def test_late_contender_puts_back_a_lock_that_replaced_the_stale_one(tmp_path):
    # Contender A judged the stale file; before A moves it, B takes it over and holds a new lock.
    path = _write_lock(tmp_path, host="node-gone-17", pid=12345)
    _age(path, 1000)
    seen = os.stat(path), path.read_bytes()
    with RunLock(tmp_path, log=lambda m: None) as b:
        logs = []
        RunLock(tmp_path, log=logs.append)._take_over(*seen, json.loads(seen[1]), "no heartbeat")
        assert json.loads(path.read_text())["token"] == b._token and logs == []
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_module_imports_no_framework():
    code = ("import sys, hpctrain.runlock; "
            "print(sorted({'torch', 'tensorflow', 'mpi4py', 'horovod', 'psutil'} & set(sys.modules)))")
    p = _python(code)
    out, _ = p.communicate(timeout=30)
    assert out.strip() == "[]"


def test_a_run_dir_that_cannot_be_created_or_written_is_one_line(tmp_path):
    with pytest.raises(RunLockError) as e:
        RunLock("/proc/hpctrain-run").acquire()
    assert str(e.value).startswith("run.run_dir (--run-dir): cannot create /proc/hpctrain-run: ")
    assert "(ENOENT)" in str(e.value) and "\n" not in str(e.value)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes through permissions: a read-only bind mount is the real thing
            subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], check=True)
        with pytest.raises(RunLockError, match=r"cannot write in .*ro: Read-only file system \(EROFS\)|Permission"):
            RunLock(ro).acquire()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])
        ro.chmod(0o755)
