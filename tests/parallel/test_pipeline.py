"""Pipeline x data parallel under a real `mpirun -np 4`: gradients and parameters equal single-process
training, schedules hold the activations they promise, tied weights are summed across stages."""
import json

from tests.launch import check_ok, run

WORKER = "tests/parallel/worker_pipeline.py"


def test_pipeline_matches_single_process_and_bounds_activations(tmp_path):
    check_ok(run("mpirun", 4, [WORKER, str(tmp_path)], timeout=600))
    res = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)}
    cases = [c for rank_cases in res.values() for c in rank_cases]
    mlp = {(c["P"], c["M"], c["schedule"]) for c in cases if c["case"] == "tied-mlp"}
    assert mlp == {(P, M, s) for P in (2, 3) for M in (1, 2, 3, 4) for s in ("1f1b", "gpipe")}
    assert {c["case"] for c in cases} == {"tied-mlp", "resnet18", "bert-tiny"}
    for c in cases:
        assert c["grad_diff"] < 1e-10 and c["param_diff"] < 1e-10, c
        P, M, s = c["P"], c["M"], c["stage"]
        # 1F1B: stage s holds at most P - s micro-batches (never more than P); GPipe holds all M.
        assert c["in_flight"] == (min(P - s, M) if c["schedule"] == "1f1b" else M), c
        assert c["schedule"] == "gpipe" or c["in_flight"] <= P
    # P=2 runs as 2 stages x 2 replicas on all four ranks; P=3 on three of them.
    assert {c["D"] for c in cases if c["P"] == 2} == {2} and len(res[3]) == 9
    # The tied weight (MLP input/head, BERT embeddings/decoder) was held, and summed, by first and last stage.
    assert all(c["tied"] == 1 for c in cases if c["case"] == "bert-tiny" and c["stage"] in (0, 2))
    assert all(c["tied"] == 0 for c in cases if c["case"] == "bert-tiny" and c["stage"] == 1)
