"""Checkpoint files: atomic writes, retention, and a resume that survives a corrupt newest file.

Framework-neutral: the engine passes `write(fileobj)` / `read(path)` callables (torch.save,
numpy, TF...). Only rank 0 calls `save`; the loaded state is broadcast by the engine.

A checkpoint `ckpt-00001234.pt` (the suffix is the manager's: `.pt` by default, `.npz`, `.weights.h5`...;
a manager sees only checkpoints with its own suffix) is written to a temp file in the same directory, fsynced, and
renamed over; its SHA-256 sits beside it in `ckpt-00001234.pt.sha256`, written before the rename,
so a file that exists always has its checksum and a flipped or truncated byte is caught on load.
A checkpoint without its checksum (copied by hand, older versions) is unverified: resume prefers an
older verified one. Temp files of an interrupted save are removed at start and after each save (the
run-directory lock guarantees no other run is writing here).
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from hpctrain.errors import CheckpointSaveError, UserError
from hpctrain.files import atomic_write, fsync_dir, sha256_file

T = TypeVar("T")
# A suffix: "." then plain name characters, more dotted parts allowed (".pt", ".npz", ".weights.h5").
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9_-]+)+$")


def _name_pattern(suffix: str) -> re.Pattern[str]:
    return re.compile(rf"^ckpt-(\d{{8,}}){re.escape(suffix)}$")


def _temp_pattern(suffix: str) -> re.Pattern[str]:
    # what save()'s mkstemp calls create: .ckpt-00001234<suffix>.XXXX.tmp and .ckpt-...<suffix>.sha256.XXXX.tmp
    return re.compile(rf"^\.ckpt-\d{{8,}}{re.escape(suffix)}(\.sha256)?\..+\.tmp$")


class CheckpointError(UserError, RuntimeError):
    pass


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, log: Callable[[str], None] = print,
                 suffix: str = ".pt"):
        if keep < 1:
            raise ValueError(f"keep={keep}: must keep at least 1 checkpoint")
        if not isinstance(suffix, str) or not _SUFFIX.match(suffix) or suffix.endswith((".sha256", ".tmp")):
            raise ValueError(f"checkpoint suffix {suffix!r}: must start with '.' and be a plain file-name part "
                             f"(letters, digits, '_', '-', more '.'-parts allowed; e.g. '.pt', '.npz', "
                             f"'.weights.h5'), not ending in .sha256 or .tmp")
        self.dir = Path(directory)
        self.keep = keep
        self.log = log
        self.suffix = suffix
        self._name = _name_pattern(suffix)
        self._temp = _temp_pattern(suffix)

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:08d}{self.suffix}"

    def list(self) -> list[Path]:
        """Complete checkpoints, newest (highest step) first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := self._name.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, step: int, write: Callable[[BinaryIO], None]) -> Path:
        """Write atomically; on any failure the temp file goes, the previous checkpoints stay, and
        CheckpointSaveError says in one line what failed (the OS error, e.g. ENOSPC, not the
        serializer's wrapper around it)."""
        final = self.path_for(step)
        try:
            self._write(final, write)
        except Exception as e:
            good = self.list()
            raise CheckpointSaveError(f"could not write checkpoint {final}: {os_reason(e)}; nothing was replaced, "
                                      f"newest good checkpoint: {good[0].name if good else 'none'}") from e
        self._prune(step)
        self.remove_stale_temps()
        return final

    def _write(self, final: Path, write: Callable[[BinaryIO], None]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            digest = sha256_file(tmp)
            atomic_write(final.with_name(final.name + ".sha256"),
                         lambda f: f.write(f"{digest}  {final.name}\n".encode()))
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove_stale_temps(self) -> list[str]:
        """Temp files of saves that never finished (a killed rank 0 leaves them, up to checkpoint size)."""
        removed = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if self._temp.match(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return removed

    def _prune(self, saved_step: int) -> None:
        """Keep the newest `keep` checkpoints at or below the step just saved; never one above it (that would
        be a step this run has not reached: not ours to remove; hpctrain.rundir sets such files aside)."""
        ours = [p for p in self.list() if int(self._name.match(p.name).group(1)) <= saved_step]
        for old in ours[self.keep:]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)

    @staticmethod
    def has_checksum(path: Path) -> bool:
        return path.with_name(path.name + ".sha256").exists()

    def verify(self, path: Path) -> None:
        side = path.with_name(path.name + ".sha256")
        if not side.exists():
            self.log(f"warning: checkpoint {path} has no {side.name}: loading it unverified")
            return
        expected = side.read_text().split()[0] if side.read_text().strip() else ""
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"checksum mismatch (expected {expected[:12]}..., got {actual[:12]}...)")

    def load_latest(self, read: Callable[[Path], T]) -> tuple[Path, T] | None:
        """Newest checkpoint that verifies and reads; a bad one is named and skipped.
        None when there is no checkpoint; CheckpointError when every one is bad."""
        candidates = self.list()
        bad = []
        for i, path in enumerate(candidates):
            if not self.has_checksum(path) and any(map(self.has_checksum, candidates[i + 1:])):
                self.log(f"warning: checkpoint {path} has no checksum file: skipped in favour of an older verified "
                         f"one (--resume {path} loads it anyway)")
                continue
            try:
                return path, self.load(path, read)
            except Exception as e:
                bad.append(path.name)
                self.log(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); falling back to the previous one")
        if bad:
            raise CheckpointError(f"no usable checkpoint in {self.dir}: all {len(bad)} are corrupt "
                                  f"({', '.join(bad)})")
        return None

    def load(self, path: Path, read: Callable[[Path], T]) -> T:
        self.verify(path)
        return read(path)


def tensor_mismatch(theirs: dict, ours: dict) -> str | None:
    """The first difference between two {name: shape} tables, as words."""
    for name, shape in ours.items():
        if name not in theirs:
            return f"it has no {name}"
        if tuple(theirs[name]) != tuple(shape):
            return f"{name} is {list(theirs[name])} there, {list(shape)} here"
    extra = [name for name in theirs if name not in ours]
    return f"it has {extra[0]}, which this model has not" if extra else None


def engine_of(path: str | os.PathLike) -> str | None:
    """Which engine wrote a checkpoint file, from its layout: 'torch' (torch.save's zip holds data.pkl),
    'tf' (the TF engine's .npz holds meta.npy), or None (neither, or not a zip at all)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any(n.endswith("/data.pkl") for n in names):
        return "torch"
    return "tf" if "meta.npy" in names else None


def os_reason(error: BaseException) -> str:
    """The operating-system cause of a failed write, wherever it sits in the exception chain (torch.save
    reports a full disk as 'enforce fail at inline_container.cc ... unexpected pos', chained to the
    OSError that says ENOSPC)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"{seen.strerror or os.strerror(seen.errno)} ({errno.errorcode.get(seen.errno, seen.errno)})"
        seen = seen.__cause__ or seen.__context__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
