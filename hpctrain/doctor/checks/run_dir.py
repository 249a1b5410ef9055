"""The run directory (--run-dir), on rank 0 only: the one rank that writes checkpoints and metrics."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from hpctrain.doctor.common import Context
from hpctrain.doctor.registry import Outcome, check

RUN_DIR_TEST_BYTES = 64 << 20
RUN_DIR_FIX = "pick a --run-dir this user can write, on a file system with room for checkpoints (ls -ld, df -h)"


@check("run dir", order=200, ranks="root", error_fix=RUN_DIR_FIX)
def run_dir(ctx: Context) -> Outcome:
    """Create, write 64 MiB, fsync, rename, read back, delete: what a checkpoint save does. Leaves nothing
    behind, not even the directories made for the test."""
    path = Path(ctx.args.run_dir).absolute()
    created = [p for p in [path, *path.parents] if not p.exists()]  # removed again afterwards
    tmp, final = path / f".doctor-{os.getpid()}.tmp", path / f".doctor-{os.getpid()}.bin"
    step = "creating the directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        data, t0, step = os.urandom(RUN_DIR_TEST_BYTES), time.perf_counter(), "writing"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            step = "fsync"
            os.fsync(f.fileno())
        step = "renaming"
        os.replace(tmp, final)
        seconds, step = time.perf_counter() - t0, "reading back"
        if final.read_bytes() != data:
            return "FAIL", f"{path}: read back differs from what was written", "use another file system"
        return "PASS", f"{path}: {RUN_DIR_TEST_BYTES >> 20} MiB written, fsynced, renamed, read back identical " \
                       f"({RUN_DIR_TEST_BYTES / seconds / 1e6:.0f} MB/s write)", None
    except OSError as e:
        return "FAIL", f"{path}: {e} (while {step})", RUN_DIR_FIX
    finally:
        for leftover in (tmp, final):
            with contextlib.suppress(OSError):
                leftover.unlink()
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
