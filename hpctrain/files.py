"""Crash-safe file helpers (stdlib only, framework-neutral).

`atomic_write` replaces one file, `atomic_replace_dir` one whole directory: a reader (or a run that
resumes after a crash) sees either the old content or the complete new one, never half of it.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_replace_dir", "fsync_dir", "sha256_file"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename/creation/removal inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write via a temp file + fsync + rename: `path` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _make_temp_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty directory with a fresh name; unlike mkdtemp's 0700 it gets the usual mode (0777 less
    the umask), since it becomes the published directory."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {parent}")


def atomic_replace_dir(path: str | os.PathLike, build: Callable[[Path], None]) -> None:
    """Replace directory `path` whole with what `build(tmp_dir)` writes into an empty temp directory.

    The temp directory is a hidden sibling of `path` (same parent, so the renames stay on one file
    system). Its files are fsynced, then the old `path` (if any) is renamed away, the new one renamed
    in, and the old one removed. On any failure (in `build` or in the swap) the temp directory goes and
    `path` is left as it was, so a reader sees the old directory or the complete new one. (Between the
    two renames `path` is briefly absent; a process killed right there leaves the old directory in a
    hidden `.NAME.*.old` sibling.)
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory: not replacing it")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    new = _make_temp_dir(parent, f".{path.name}.", ".tmp")
    old: Path | None = None
    old_moved = False
    try:
        build(new)
        _fsync_tree(new)
        if os.path.lexists(path):
            # mkdtemp reserves a fresh hidden name; renaming a directory onto an empty one replaces it
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old)
            old_moved = True
        os.replace(new, path)
    except BaseException:
        if old_moved:
            os.replace(old, path)  # put the old directory back
        elif old is not None:
            old.rmdir()  # the reserved name, never used
        shutil.rmtree(new, ignore_errors=True)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(parent)
