"""Debian packages the test tiers need (Slurm, ssh, container tools), installed with apt-get when missing, so a
fresh machine runs every tier with no manual step. Needs root."""
from __future__ import annotations

import os
import subprocess
import time


def apt_install(packages: list[str], who: str, error: type[Exception] = RuntimeError, log=print) -> float:
    """Install `packages` (nothing if empty); seconds spent. A failure raises `error` naming the command and the
    end of apt-get's message."""
    if not packages:
        return 0.0
    if os.geteuid() != 0:
        raise error(f"{who}: missing {' '.join(packages)} and not root to install them")
    start = time.monotonic()
    log(f"{who}: installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise error(f"{' '.join(cmd)} failed (rc={p.returncode}): {p.stderr.strip()[-500:]}")
    return time.monotonic() - start
