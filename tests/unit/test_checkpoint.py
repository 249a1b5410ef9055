import errno
import pickle
import re

import pytest

from hpctrain.checkpoint import CheckpointError, CheckpointManager, engine_of, os_reason, tensor_mismatch
from hpctrain.errors import CheckpointSaveError


def _write(obj):
    return lambda f: pickle.dump(obj, f)


def _read(p):
    with open(p, "rb") as f:
        return pickle.load(f)


def test_save_keeps_last_k_and_leaves_no_temp_files(tmp_path):
    m = CheckpointManager(tmp_path, keep=2, log=lambda *_: None)
    for step in (1, 2, 3):
        m.save(step, _write({"step": step}))
    assert [p.name for p in m.list()] == ["ckpt-00000003.pt", "ckpt-00000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002.pt", "ckpt-00000002.pt.sha256",
                                                          "ckpt-00000003.pt", "ckpt-00000003.pt.sha256"]
    assert m.load_latest(_read)[1] == {"step": 3}


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, keep=3, log=lambda *_: None)
    m.save(5, _write({"step": 5}))

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")
    with pytest.raises(CheckpointSaveError, match="disk full; nothing was replaced, newest good checkpoint: "
                                                  "ckpt-00000005.pt"):
        m.save(5, boom)
    assert _read(m.path_for(5)) == {"step": 5}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_falls_back_and_names_the_file(tmp_path, damage):
    logs = []
    m = CheckpointManager(tmp_path, keep=3, log=logs.append)
    m.save(1, _write({"step": 1, "pad": b"x" * 1000}))
    newest = m.save(2, _write({"step": 2, "pad": b"y" * 1000}))
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[500] ^= 0xFF  # a flipped byte pickle would still load: only the checksum sees it
        newest.write_bytes(bytes(data))
    path, state = m.load_latest(_read)
    assert state["step"] == 1 and path.name == "ckpt-00000001.pt"
    assert any("ckpt-00000002.pt" in line and "corrupt" in line for line in logs)


def test_all_corrupt_is_an_error_and_no_checkpoint_is_none(tmp_path):
    m = CheckpointManager(tmp_path, keep=3, log=lambda *_: None)
    assert m.load_latest(_read) is None
    m.save(7, _write(1))
    m.path_for(7).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="ckpt-00000007.pt"):
        m.load_latest(_read)


def test_os_reason_finds_the_os_error_behind_a_serializer_error():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nmore")  # noqa: B904
    except RuntimeError as e:
        assert os_reason(e) == "No space left on device (ENOSPC)"
    assert os_reason(RuntimeError("first line\nsecond")) == "RuntimeError: first line"


def test_unverified_newest_is_skipped_for_an_older_verified_one(tmp_path):
    logs = []
    m = CheckpointManager(tmp_path, keep=3, log=logs.append)
    m.save(1, _write({"step": 1}))
    newest = m.save(2, _write({"step": 2}))
    newest.with_name(newest.name + ".sha256").unlink()
    path, state = m.load_latest(_read)
    assert state == {"step": 1}
    assert len(logs) == 1 and "ckpt-00000002.pt has no checksum" in logs[0]
    logs.clear()
    assert m.load(newest, _read) == {"step": 2}  # named explicitly (--resume FILE): loaded, with a warning
    assert len(logs) == 1 and "unverified" in logs[0]
    m.path_for(1).with_name("ckpt-00000001.pt.sha256").unlink()
    logs.clear()
    assert m.load_latest(_read)[1] == {"step": 2}  # none verified: the newest, with a warning
    assert len(logs) == 1 and "unverified" in logs[0]


def test_stale_temp_files_are_removed_after_a_save(tmp_path):
    m = CheckpointManager(tmp_path, keep=3, log=lambda *_: None)
    stale = [tmp_path / ".ckpt-00000004.pt.k2j3h4.tmp", tmp_path / ".ckpt-00000004.pt.sha256.x8y.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    other = tmp_path / ".notes.tmp"
    other.write_text("not ours")
    m.save(5, _write(5))
    assert not any(p.exists() for p in stale) and other.exists()
    stale[0].write_bytes(b"y")
    assert m.remove_stale_temps() == [stale[0].name]


@pytest.mark.parametrize("suffix", [".npz", ".weights.h5"])
def test_other_suffix_retention_checksum_fallback_and_stale_temps(tmp_path, suffix):
    logs = []
    m = CheckpointManager(tmp_path, keep=2, log=logs.append, suffix=suffix)
    for step in (1, 2, 3):
        m.save(step, _write({"step": step}))
    names = [f"ckpt-00000003{suffix}", f"ckpt-00000002{suffix}"]
    assert [p.name for p in m.list()] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + [n + ".sha256" for n in names])
    assert m.load_latest(_read)[1] == {"step": 3}

    m.path_for(3).write_bytes(b"garbage")  # checksum mismatch: falls back to step 2
    path, state = m.load_latest(_read)
    assert state == {"step": 2} and path.name == f"ckpt-00000002{suffix}"
    assert any(f"ckpt-00000003{suffix}" in line and "corrupt" in line for line in logs)

    stale = [tmp_path / f".ckpt-00000004{suffix}.k2j3h4.tmp", tmp_path / f".ckpt-00000004{suffix}.sha256.x8y.tmp"]
    pt_temp = tmp_path / ".ckpt-00000004.pt.abc123.tmp"  # another manager's temp: not ours
    for p in stale + [pt_temp]:
        p.write_bytes(b"x")
    m.save(5, _write(5))
    assert not any(p.exists() for p in stale) and pt_temp.exists()


def test_a_pt_manager_ignores_npz_checkpoints_in_the_same_directory(tmp_path):
    npz = CheckpointManager(tmp_path, keep=1, log=lambda *_: None, suffix=".npz")
    for step in (8, 9):
        npz.save(step, _write({"npz": step}))
    pt = CheckpointManager(tmp_path, keep=1, log=lambda *_: None)
    assert pt.list() == [] and pt.load_latest(_read) is None
    pt.save(1, _write({"pt": 1}))
    pt.save(2, _write({"pt": 2}))  # pruning keeps 1 .pt and leaves the .npz alone
    stale_npz = tmp_path / ".ckpt-00000010.npz.abc.tmp"
    stale_npz.write_bytes(b"x")
    assert pt.remove_stale_temps() == []
    assert [p.name for p in pt.list()] == ["ckpt-00000002.pt"]
    assert [p.name for p in npz.list()] == ["ckpt-00000009.npz"]
    assert pt.load_latest(_read)[1] == {"pt": 2} and npz.load_latest(_read)[1] == {"npz": 9}


@pytest.mark.parametrize("bad", ["pt", "", ".", "..", "./x", ".a/b", ".p t", ".pt.", "/abs.pt", ".pt.sha256", ".tmp",
                                 None])
def test_bad_suffix_is_a_value_error_naming_it(tmp_path, bad):
    with pytest.raises(ValueError, match=f"suffix {re.escape(repr(bad))}"):
        CheckpointManager(tmp_path, suffix=bad)


def test_retention_never_removes_a_checkpoint_above_the_one_just_saved(tmp_path):
    # Checkpoints at 10/15/20 are above a save at step 5: none of them may be pruned, and neither may step 5
    # (the old code kept "the three highest steps" and deleted the new run's checkpoint at once).
    m = CheckpointManager(tmp_path, keep=2, log=lambda *_: None)
    for step in (10, 15, 20):
        m.save(step, _write({"step": step}))
    m.save(5, _write({"step": 5}))
    assert [p.name for p in m.list()] == [f"ckpt-{s:08d}.pt" for s in (20, 15, 5)]  # 10 was pruned by 20's save
    m.save(6, _write({"step": 6}))
    assert [p.name for p in m.list()] == [f"ckpt-{s:08d}.pt" for s in (20, 15, 6, 5)]
    m.save(7, _write({"step": 7}))
    assert [p.name for p in m.list()] == [f"ckpt-{s:08d}.pt" for s in (20, 15, 7, 6)]


def test_engine_of_names_the_writer(tmp_path):
    import io
    import json as _json

    import numpy as np
    import torch
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "a.pt")
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(_json.dumps({"step": 1})), **{"model/0": np.zeros(2)})
    (tmp_path / "b.npz").write_bytes(buf.getvalue())
    (tmp_path / "c.txt").write_text("hello")
    assert [engine_of(tmp_path / n) for n in ("a.pt", "b.npz", "c.txt", "missing")] == ["torch", "tf", None, None]


def test_tensor_mismatch_names_the_first_difference():
    ours = {"conv.weight": (64, 3, 7, 7), "fc.weight": (5, 512)}
    assert tensor_mismatch(dict(ours), ours) is None
    assert tensor_mismatch({**ours, "fc.weight": (10, 512)}, ours) == "fc.weight is [10, 512] there, [5, 512] here"
    assert tensor_mismatch({"conv.weight": (64, 3, 7, 7)}, ours) == "it has no fc.weight"
    assert tensor_mismatch({**ours, "extra.bias": (3,)}, ours) == "it has extra.bias, which this model has not"
