import hashlib
import os

import pytest

from hpctrain.files import atomic_replace_dir, atomic_write, fsync_dir, sha256_file


def _leftovers(d, keep):
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def test_atomic_write_replaces_the_file(tmp_path):
    p = tmp_path / "plan.json"
    atomic_write(p, lambda f: f.write(b"old"))
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new"
    assert _leftovers(tmp_path, {"plan.json"}) == []


def test_atomic_write_failing_writer_keeps_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "plan.json"
    p.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, boom)
    assert p.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"plan.json"}) == []


def test_atomic_replace_dir_creates_and_replaces_whole(tmp_path):
    target = tmp_path / "export"

    def build_v1(d):
        (d / "config.json").write_text("v1")
        (d / "only_in_v1.bin").write_bytes(b"1")
        (d / "sub").mkdir()
        (d / "sub" / "x").write_text("v1")
    atomic_replace_dir(target, build_v1)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "only_in_v1.bin", "sub"]

    def build_v2(d):
        assert list(d.iterdir()) == []  # build starts from an empty directory, not a copy of the old one
        assert d.parent == tmp_path and d.name.startswith(".")
        (d / "config.json").write_text("v2")
    atomic_replace_dir(target, build_v2)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # whole: no file of v1 survives
    assert (target / "config.json").read_text() == "v2"
    assert _leftovers(tmp_path, {"export"}) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # the published dir gets the usual mode, not 0700


def test_atomic_replace_dir_failing_build_keeps_the_old_dir_and_no_temp(tmp_path):
    target = tmp_path / "export"
    atomic_replace_dir(target, lambda d: (d / "config.json").write_text("old"))

    def boom(d):
        (d / "config.json").write_text("half")
        (d / "weights.bin").write_bytes(b"x" * 100)
        raise RuntimeError("serializer failed")
    with pytest.raises(RuntimeError, match="serializer failed"):
        atomic_replace_dir(target, boom)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert (target / "config.json").read_text() == "old"
    assert _leftovers(tmp_path, {"export"}) == []


def test_atomic_replace_dir_failing_swap_restores_the_old_dir(tmp_path, monkeypatch):
    target = tmp_path / "export"
    atomic_replace_dir(target, lambda d: (d / "a").write_text("old"))
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved away, now moving the new one in fails
            raise OSError("rename failed")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        atomic_replace_dir(target, lambda d: (d / "a").write_text("new"))
    monkeypatch.undo()
    assert (target / "a").read_text() == "old"
    assert _leftovers(tmp_path, {"export"}) == []


def test_atomic_replace_dir_failing_build_without_an_old_dir_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        atomic_replace_dir(tmp_path / "export", lambda d: (_ for _ in ()).throw(ValueError("no")))
    assert list(tmp_path.iterdir()) == []


def test_atomic_replace_dir_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "export"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError, match="export"):
        atomic_replace_dir(target, lambda d: None)
    assert target.read_text() == "a file" and _leftovers(tmp_path, {"export"}) == []


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])
def test_sha256_file_matches_hashlib(tmp_path, size):
    data = os.urandom(size)
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(p)) == hashlib.sha256(data).hexdigest()


def test_fsync_dir_accepts_a_directory(tmp_path):
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))
