"""Each benchmark runs from the repo at tiny sizes and writes a well-formed result."""
import json
import math

from tests.launch import run


def _result(tmp_path, name):
    files = list(tmp_path.glob(f"*-{name}.json"))
    assert len(files) == 1, list(tmp_path.iterdir())
    data = json.loads(files[0].read_text())
    assert data["benchmark"] == name and data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    return data


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_allreduce_smoke(tmp_path):
    p = run("mpirun", 2, ["benchmarks/allreduce.py", "--min-bytes", "4K", "--max-bytes", "16K", "--variant-sizes",
                          "16K", "--repeats", "2", "--budget-s", "0.05", "--out", str(tmp_path)], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _result(tmp_path, "allreduce")
    engines = {r["engine"] for r in data["rows"]}
    assert {"numpy_copy", "mpi4py", "horovod", "hpctrain", "torch_gloo", "hvd_cycle1ms", "hvd_cycle10ms",
            "hvd_cycle1ms_fp16"} <= engines
    assert data["np"] == 2 and sorted({r["bytes"] for r in data["rows"]}) == [4096, 16384]
    for r in data["rows"]:
        assert all(_positive_finite(r[k]) for k in ("time_s", "algbw_GBps", "busbw_GBps")), r
    assert all(_positive_finite(v) for ratio in data["ratios"].values() for v in ratio.values())
    assert list(tmp_path.glob("*-allreduce.png"))


def test_scaling_smoke(tmp_path):
    p = run("single", 1, ["benchmarks/scaling.py", "--max-np", "2", "--image-size", "32", "--batch-size", "4",
                          "--steps", "4", "--out", str(tmp_path)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _result(tmp_path, "scaling")
    assert {(r["engine"], r["np"]) for r in data["rows"]} == {
        (e, n) for e in ("hpctrain_horovod", "hpctrain_ddp", "plain_horovod_cycle10ms", "plain_horovod_default")
        for n in (1, 2)}
    for r in data["rows"]:
        assert all(_positive_finite(r[k]) for k in ("samples_per_s_total", "samples_per_s_rank", "efficiency")), r
    assert all(_positive_finite(v) for ratio in data["ratios"].values() for v in ratio.values())


def test_dataloading_smoke(tmp_path):
    p = run("single", 1, ["benchmarks/dataloading.py", "--workers", "0,1", "--batches", "2", "--batch-size", "4",
                          "--out", str(tmp_path)], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _result(tmp_path, "dataloading")
    assert {(r["dataset"], r["workers"]) for r in data["rows"]} == {
        (d, w) for d in ("shapes", "synthetic", "folder") for w in (0, 1)}
    for r in data["rows"]:
        assert all(_positive_finite(r[k]) for k in ("images_per_s", "training_consumes_per_s",
                                                    "delivered_vs_consumed", "memcpy_images_per_s")), r
