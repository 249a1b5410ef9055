import pickle

import pytest

from hpctrain.checkpoint import CheckpointError, CheckpointManager


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
    with pytest.raises(OSError):
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
