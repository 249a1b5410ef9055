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
                          "16K", "--repeats", "2", "--budget-s", "0.05", "--tf-strategy", "--out", str(tmp_path)],
            timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _result(tmp_path, "allreduce")
    engines = {r["engine"] for r in data["rows"]}
    assert {"numpy_copy", "mpi4py", "horovod", "hpctrain", "torch_gloo", "hvd_cycle1ms", "hvd_cycle10ms",
            "hvd_cycle1ms_fp16", "tf_multiworker_ring"} <= engines
    assert data["tf_strategy"]["collective"] == "RING"
    assert all("tf_multiworker_ring_vs_horovod" in ratio for ratio in data["ratios"].values())
    assert data["np"] == 2 and sorted({r["bytes"] for r in data["rows"]}) == [4096, 16384]
    for r in data["rows"]:
        assert all(_positive_finite(r[k]) for k in ("time_s", "algbw_GBps", "busbw_GBps")), r
    assert all(_positive_finite(v) for ratio in data["ratios"].values() for v in ratio.values())
    assert list(tmp_path.glob("*-allreduce.png"))


def test_scaling_smoke(tmp_path):
    # The whole ResNet engine matrix at np=2 (the np=1 rows and the efficiencies they give: test_scaling_bert_smoke
    # end to end, the rules in tests/unit/test_scaling_rows)
    p = run("single", 1, ["benchmarks/scaling.py", "--min-np", "2", "--max-np", "2", "--image-size", "32",
                          "--batch-size", "4", "--steps", "4", "--out", str(tmp_path)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _result(tmp_path, "scaling")
    assert (data["model"], data["arch"]) == ("resnet", "resnet18")
    assert {(r["engine"], r["np"]) for r in data["rows"]} == {
        (e, 2) for e in ("hpctrain_horovod", "hpctrain_mpi", "hpctrain_ddp", "plain_horovod_cycle10ms",
                         "plain_horovod_default", "ceiling_no_comm")}
    for r in data["rows"]:
        assert all(_positive_finite(r[k]) for k in ("samples_per_s_total", "samples_per_s_rank",
                                                    "efficiency_vs_ceiling")), r
        assert r["efficiency"] is None, r  # no np=1 row to compare with
    assert {r["efficiency_vs_ceiling"] for r in data["rows"] if r["engine"] == "ceiling_no_comm"} == {1.0}
    assert all(_positive_finite(v) for ratio in data["ratios"].values() for v in ratio.values())


def test_scaling_tf_smoke(tmp_path):
    # The three TF rows at np=2 only (a TensorFlow start-up per row; the np=1 rules are tests/unit/test_scaling_rows)
    p = run("single", 1, ["benchmarks/scaling.py", "--min-np", "2", "--max-np", "2", "--image-size", "32",
                          "--batch-size", "4", "--steps", "4", "--engines", "tf", "--out", str(tmp_path)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _result(tmp_path, "scaling")
    rows = {r["engine"]: r for r in data["rows"]}
    assert set(rows) == {"tf_horovod", "tf_multiworker", "tf_mirrored"} and {r["np"] for r in rows.values()} == {2}
    assert rows["tf_mirrored"]["processes"] == 1 and rows["tf_mirrored"]["threads_per_process"] == 2
    assert rows["tf_horovod"]["processes"] == 2 and rows["tf_multiworker"]["processes"] == 2
    for r in rows.values():
        assert all(_positive_finite(r[k]) for k in ("samples_per_s_total", "samples_per_s_rank")), r
        assert r["efficiency"] is None and r["efficiency_vs_ceiling"] is None, r  # no np=1 row; no torch ceiling
    assert set(data["ratios"]["2"]) == {"tf_mirrored_vs_tf_horovod", "tf_multiworker_vs_tf_horovod"}
    assert all(_positive_finite(v) for v in data["ratios"]["2"].values())
    assert list(tmp_path.glob("*-scaling.png"))


def test_scaling_bert_smoke(tmp_path):
    # BERT-tiny at seq 32 on a built-in corpus prepared into tmp_path: an engine through Horovod, one through
    # torch.distributed and the ceiling (the whole engine matrix is test_scaling_smoke's), 6 launches
    engines = "hpctrain_horovod,hpctrain_ddp,ceiling_no_comm"
    p = run("single", 1, ["benchmarks/scaling.py", "--model", "bert", "--max-np", "2", "--seq-len", "32",
                          "--batch-size", "4", "--steps", "4", "--engines", engines,
                          "--corpus-cache", str(tmp_path / "corpus"), "--out", str(tmp_path)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    data = _result(tmp_path, "scaling-bert")
    assert not list(tmp_path.glob("*-scaling.json"))  # never the ResNet result's name
    assert (data["model"], data["preset"], data["seq_len"], data["samples"]) == ("bert", "tiny", 32, "sequences")
    assert data["vocab_size"] == json.loads((tmp_path / "corpus" / "manifest.json").read_text())["vocab_size"]
    assert {(r["engine"], r["np"]) for r in data["rows"]} == {(e, n) for e in engines.split(",") for n in (1, 2)}
    for r in data["rows"]:
        assert all(_positive_finite(r[k]) for k in ("samples_per_s_total", "samples_per_s_rank", "efficiency",
                                                    "efficiency_vs_ceiling")), r
    assert set(data["ratios"]["2"]) == {"hpctrain_horovod_vs_ddp", "hpctrain_horovod_vs_ceiling", "ceiling_vs_linear"}
    assert all(_positive_finite(v) for ratio in data["ratios"].values() for v in ratio.values())
    assert list(tmp_path.glob("*-scaling-bert.png"))


def test_scaling_bert_too_few_sequences_fails_before_timing(tmp_path):
    p = run("single", 1, ["benchmarks/scaling.py", "--model", "bert", "--max-np", "2", "--seq-len", "32",
                          "--steps", "100000", "--corpus-cache", str(tmp_path / "corpus"), "--out", str(tmp_path)],
            timeout=300)
    assert p.returncode != 0 and "full sequences" in p.stderr and "lower --steps" in p.stderr, p.stderr[-2000:]
    assert "hpctrain_horovod" not in p.stdout and not list(tmp_path.glob("*.json"))


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


def test_pipeline_smoke(tmp_path):
    # --quick: resnet18 + BERT tiny, P in (2, 4), M in (2, 4), one Horovod pass; ~40 s on an idle 2-core box.
    p = run("single", 1, ["-m", "benchmarks.pipeline", "--quick", "--out", str(tmp_path)], timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "pipeline.json").read_text())
    assert data["benchmark"] == "pipeline" and data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    assert (tmp_path / "pipeline.png").stat().st_size > 0
    assert set(data["partition"]) == {"resnet18", "bert-tiny"}
    for model, r in data["partition"].items():
        assert set(r["P"]) == {"2", "4"}, model
        for P, e in r["P"].items():
            m = e["methods"]
            assert set(m) == {"time", "params", "uniform"}
            for method, v in m.items():
                assert v["predicted_balance"] >= 1 - 1e-9, (model, P, method, v)
                assert len(v["stages"]) == len(v["stage_blocks"]) == len(v["measured_stage_ms"]) == int(P)
                assert v["stages"][0][0] == 0 and v["stages"][-1][1] == len(r["blocks"])
                assert all(_positive_finite(x) for x in (v["predicted_bottleneck_ms"], v["measured_bottleneck_ms"],
                                                         v["measured_balance"], *v["measured_stage_ms"]))
                assert v["predicted_bottleneck_ms"] >= m["time"]["predicted_bottleneck_ms"] * (1 - 1e-9)
            assert all(_positive_finite(x) for x in e["ratios"].values())
            assert e["ratios"]["predicted_params_vs_time"] >= 1 - 1e-9
            assert e["ratios"]["predicted_uniform_vs_time"] >= 1 - 1e-9
    b = data["pipeline"]
    assert b["P"] == 2 and {(r["schedule"], r["M"]) for r in b["rows"]} == {
        (s, m) for s in ("1f1b", "gpipe") for m in (2, 4)}
    for r in b["rows"]:
        assert all(_positive_finite(r[k]) for k in ("steps_per_s", "speedup", "efficiency", "sequential_step_s",
                                                    "efficiency_vs_ideal", "efficiency_vs_simulated_ideal")), r
        assert 0 < r["ideal_efficiency"] <= 1 and 0 < r["simulated_ideal_efficiency"] <= 1 + 1e-9, r
        # 1F1B holds at most P - s micro-batches on stage s, GPipe all M
        assert r["peak_in_flight_per_stage"] == ([min(r["M"], 2), 1] if r["schedule"] == "1f1b" else [r["M"]] * 2)
    c = data["reducers"]
    engines = {row["engine"] for row in c["rows"] if _positive_finite(row["algbw_GBps"])}
    assert "mpi" in engines, c
    assert "horovod" in engines or c["horovod_errors"], c
    assert all(_positive_finite(q["horovod_vs_mpi"]) for q in c["ratios"])


def test_scaling_sync_smoke(tmp_path):
    # the synchronization strategies beside plain allreduce on --backend mpi, np=2 only: the bytes each hands over
    engines = "hpctrain_mpi,sync_local_sgd_k4,sync_powersgd_r8,sync_zero,sync_gossip,sync_ps"
    p = run("single", 1, ["benchmarks/scaling.py", "--min-np", "2", "--max-np", "2", "--image-size", "32",
                          "--batch-size", "4", "--steps", "4", "--engines", engines, "--out", str(tmp_path)],
            timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["engine"]: r for r in _result(tmp_path, "scaling")["rows"]}
    assert set(rows) == set(engines.split(",")) and {r["np"] for r in rows.values()} == {2}
    assert all(_positive_finite(r[k]) for r in rows.values() for k in ("samples_per_s_total", "peak_rss_mib"))
    assert all(r["efficiency"] is None for r in rows.values())  # no np=1 row to compare with
    sent = {e: r.get("sent_vs_allreduce") for e, r in rows.items()}
    # 4 steps: the model averaged once (after step 1); PowerSGD's 2 uncompressed steps, then rank-8 factors;
    # ZeRO: the reduce-scatter's input (every gradient) and this rank's half for the allgather
    assert 0.2 < sent["sync_local_sgd_k4"] < 0.3 and 0.5 < sent["sync_powersgd_r8"] < 0.6, sent
    assert abs(sent["sync_zero"] - 1.5) < 0.01, sent
    assert 1.0 < sent["sync_gossip"] < 1.01, sent  # the model and BatchNorm's statistics to the one peer, each step
    assert abs(sent["sync_ps"] - 2.0) < 0.01, sent  # per replica (1 worker): the gradient up, the weights down
