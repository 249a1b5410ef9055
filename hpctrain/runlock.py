"""Run-directory lock: at most one training run writes into a run dir at a time.

Two runs started into the same run dir (a requeued Slurm job while the old allocation is still
draining, a job submitted twice) must not both write checkpoints. Rank 0 holds a `RunLock` on the run
dir for the run's lifetime and releases it at the end; other ranks take none. Framework-neutral,
standard library only.

Why an O_EXCL lock file, not flock/fcntl: run dirs live on shared file systems, where flock/fcntl work
or not (or only within one node) depending on mount options and server setup (NFS `nolock`/`local_lock`,
Lustre `flock`/`localflock`/`noflock`), and a lock of a node that vanished may never be freed.
`os.open(O_CREAT | O_EXCL)` is atomic on local file systems, NFSv3 and later, NFSv4 and Lustre: exactly
one creator wins. Whether an existing lock is stale is decided from its content and its heartbeat:

- The file holds JSON: host, pid, the pid's start time (/proc/<pid>/stat field 22, so a reused pid is
  not mistaken for the holder), pid namespace, Slurm job id, a random token and the start time. It is
  written and fsynced through the O_EXCL descriptor.
- While held, a daemon thread touches the file's mtime every `heartbeat` seconds.
- A holder with our Slurm job id and a lower (restart count, step id) is the run before a requeue, or the
  step before a relaunch in the same allocation: it has ended. A holder on this host (same host name and pid
  namespace) is stale when its pid is not running or now
  belongs to another process. Any other holder is stale when the mtime is older than `stale_after`
  seconds (so node and file-server clocks must agree to well within `stale_after`). An unreadable file
  (its holder died between create and write) is stale once `UNREADABLE_GRACE_S` old; before that it
  is taken as being written right now.
- Takeover first renames the stale file to a unique name. Rename is atomic, so of two contenders only
  one moves the file; the other gets FileNotFoundError and starts over. The mover checks that it moved
  the very file it judged stale (inode, mtime, content) and moves it back otherwise (a contender had
  already replaced it by its own live lock). A third contender arriving within the microseconds
  between such a move and its undo is not covered.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from hpctrain.errors import UserError

LOCK_NAME = ".hpctrain.lock"
UNREADABLE_GRACE_S = 5.0
ATTEMPTS = 20
RETRY_SLEEP_S = 0.05  # wait for a lock file that is being written; 20 x 0.05 s bounds that to 1 s


_HELD: set[RunLock] = set()  # locks this process holds, for release_all() on a hard exit


def release_all() -> None:
    """Release every lock this process holds (before an exit that skips atexit handlers)."""
    for lock in list(_HELD):
        lock.release()


class RunLockError(UserError):
    """The run dir is held by a live run, or the lock could not be taken."""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process; None if it or /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            after_comm = f.read().rsplit(b")", 1)[1].split()  # comm (field 2) may hold spaces and ')'
        return after_comm[0].decode(), int(after_comm[19])  # fields 3 (state) and 22 (starttime)
    except (OSError, IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    return not (stat and stat[0] in ("Z", "X"))  # a zombie is dead, only not yet reaped by its parent


def _pid_namespace() -> str | None:
    # Same host name but another pid namespace (a container): its pids mean nothing here.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _read(path: Path) -> tuple[os.stat_result, bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.fstat(fd), os.read(fd, 1 << 16)  # stat and content of the same file
    finally:
        os.close(fd)


def _parse(raw: bytes) -> dict | None:
    """The holder record, or None for a half-written or damaged file."""
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    valid = isinstance(holder, dict) and isinstance(holder.get("host"), str) and type(holder.get("pid")) is int
    return holder if valid and holder["pid"] > 0 else None  # pid 0 / -1 would make kill(pid, 0) hit groups


def _why(error: OSError) -> str:
    return f"{error.strerror or error} ({errno.errorcode.get(error.errno, error.errno)})"


def _iso(t) -> str:
    try:
        return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


class RunLock:
    """Exclusive lock on `run_dir` for one run: `acquire()` ... `release()`, or `with RunLock(d):`."""

    def __init__(self, run_dir, job_id: str | None = None, stale_after: float = 120.0,
                 heartbeat: float = 15.0, log: Callable[[str], object] = print, restart: int = 0,
                 step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.job_id, self.stale_after, self.heartbeat, self.log = job_id, stale_after, heartbeat, log
        self.restart = restart  # Slurm's SLURM_RESTART_COUNT: which incarnation of a requeued job we are
        self.step = step  # Slurm's job step: a relaunch in the same allocation comes with a higher one
        self.host = socket.gethostname()
        self._fd: int | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self.held:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunLockError(f"run.run_dir (--run-dir): cannot create {self.run_dir}: {_why(e)}") from None
        holder = None
        for _ in range(ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            except OSError as e:  # a read-only file system, no permission: nothing of the run could be written
                raise RunLockError(f"run.run_dir (--run-dir): cannot write in {self.run_dir}: {_why(e)}") from None
            else:
                self._own(fd)
                return self
            try:
                seen_stat, seen_raw = _read(self.path)
            except FileNotFoundError:
                continue  # released or moved away meanwhile
            holder = _parse(seen_raw)
            reason = self._stale_reason(holder, time.time() - seen_stat.st_mtime)
            if reason is not None:
                self._take_over(seen_stat, seen_raw, holder, reason)
            elif holder is not None:
                raise RunLockError(self._in_use(holder))
            else:
                time.sleep(RETRY_SLEEP_S)  # being written right now
        if holder is None:
            raise RunLockError(self._in_use({}))
        raise RunLockError(f"run dir {self.run_dir}: could not take the lock in {ATTEMPTS} attempts "
                           f"(other runs kept taking it): try again")

    def release(self) -> None:
        """Stop the heartbeat; remove the lock file only if it still holds our token. Idempotent."""
        if self._fd is None:
            return
        _HELD.discard(self)
        self._stop.set()
        self._beat.join()
        try:
            _, raw = _read(self.path)
            if (_parse(raw) or {}).get("token") == self._token:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = self._token = self._beat = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _own(self, fd: int) -> None:
        token = secrets.token_hex(16)
        pid = os.getpid()
        record = {"host": self.host, "pid": pid, "pid_start": process_start_time(pid), "pid_ns": _pid_namespace(),
                  "job_id": self.job_id, "restart": self.restart, "step": self.step, "token": token,
                  "started": time.time()}
        try:
            data = json.dumps(record).encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._fd, self._token = fd, token
        _HELD.add(self)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, args=(fd,), name="hpctrain-runlock", daemon=True)
        self._beat.start()

    def _heartbeat(self, fd: int) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(fd)  # through our descriptor: never touches a file that replaced ours
            except OSError:
                pass  # passing file-system trouble: the next beat tries again

    def _on_this_host(self, holder: dict) -> bool:
        theirs, ours = holder.get("pid_ns"), _pid_namespace()
        return holder["host"] == self.host and (theirs is None or ours is None or theirs == ours)

    def _stale_reason(self, holder: dict | None, age: float) -> str | None:
        """Why the lock is stale, or None while it counts as held."""
        if holder is None:
            return f"lock file unreadable and unchanged for {age:.0f} s" if age > UNREADABLE_GRACE_S else None
        pid = holder["pid"]
        if self.job_id and holder.get("job_id") == self.job_id:
            # Slurm starts a requeued job only after its previous run has ended, and the batch script
            # relaunches a failed step only after it has ended: the holder is that run or step (killed
            # before it could remove the file), whichever node it ran on.
            theirs = (holder.get("restart") or 0, holder.get("step") if holder.get("step") is not None else -1)
            ours = (self.restart, self.step if self.step is not None else -1)
            if theirs < ours:
                return f"an earlier run of Slurm job {self.job_id} (restart {theirs[0]}, step {theirs[1]})"
        if self._on_this_host(holder):
            if not _pid_alive(pid):
                return f"pid {pid} is not running"
            start, recorded = process_start_time(pid), holder.get("pid_start")
            if start is not None and recorded is not None:
                return None if start == recorded else f"pid {pid} now belongs to another process"
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_after:g} s)"
        return None

    def _take_over(self, seen_stat: os.stat_result, seen_raw: bytes, holder: dict | None, reason: str) -> None:
        moved = self.path.with_name(f"{LOCK_NAME}.stale.{secrets.token_hex(8)}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another contender moved it first: start over
        moved_stat, moved_raw = _read(moved)
        moved_id, seen_id = (moved_stat.st_ino, moved_stat.st_mtime_ns), (seen_stat.st_ino, seen_stat.st_mtime_ns)
        if (moved_id, moved_raw) != (seen_id, seen_raw):
            os.rename(moved, self.path)  # a contender's new lock, not the stale one: put it back
            return
        os.unlink(moved)
        h = holder or {}
        self.log(f"run dir {self.run_dir}: taking over stale lock of host {h.get('host', '?')} pid {h.get('pid', '?')} "
                 f"(job {h.get('job_id') or '-'}): {reason}")

    def _in_use(self, holder: dict) -> str:
        return (f"run dir {self.run_dir} is in use by another run (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, Slurm job {holder.get('job_id') or '-'}, since "
                f"{_iso(holder.get('started'))}): wait for it to end, or use another --run-dir")
