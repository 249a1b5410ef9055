"""Pipeline partitioning: the DP against brute force, the other methods, the cost model, plan files, errors."""
from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from itertools import combinations

import pytest

from hpctrain.pipeline.partition import LayerCost, PartitionError, Plan, partition, stage_memory, stage_time

# ---------------------------------------------------------------------------------------------------- helpers


def _splits(n_blocks: int, n_stages: int):
    """Every contiguous split, in lexicographic order of the cut list (so the first optimum is the earliest)."""
    for cuts in combinations(range(1, n_blocks), n_stages - 1):
        edges = (0, *cuts, n_blocks)
        yield list(zip(edges[:-1], edges[1:]))


def _rand_costs(rng: random.Random, n: int) -> list[LayerCost]:
    costs = []
    for i in range(n):
        # Half the values come from a tiny set so that ties between splits are common.
        t = rng.choice([0.0, 0.5, 1.0, 2.0]) if rng.random() < 0.5 else rng.uniform(0, 10)
        p = rng.choice([0, 100, 200]) if rng.random() < 0.3 else rng.randint(0, 1000)
        saved = 0 if rng.random() < 0.5 else rng.randint(0, 300)
        costs.append(LayerCost(f"b{i}", t, p, rng.randint(0, 500), saved))
    return costs


def _mems(costs, bounds, slots, factor):
    return [stage_memory(costs, a, b, slots[s], factor) for s, (a, b) in enumerate(bounds)]


def _check_shape(plan: Plan, n_blocks: int, n_stages: int) -> None:
    assert len(plan.stages) == n_stages
    assert plan.stages[0][0] == 0 and plan.stages[-1][1] == n_blocks
    for (_, b), (c, _) in zip(plan.stages, plan.stages[1:]):
        assert b == c
    assert all(b > a for a, b in plan.stages)
    assert len(plan.stage_times) == len(plan.stage_memory) == n_stages
    assert plan.bottleneck == max(plan.stage_times)
    assert plan.lower_bound <= plan.bottleneck * (1 + 1e-12)  # mathematically <=; allow the last ulp


def _min_cap_in(err: PartitionError) -> int:
    m = re.search(r"smallest cap that fits is [^ ]+ GiB \((\d+) bytes\)", str(err))
    assert m, str(err)
    return int(m.group(1))


def _random_request(rng: random.Random):
    n = rng.randint(1, 9)
    p = rng.randint(1, min(n, 5))
    costs = _rand_costs(rng, n)
    bw = None if rng.random() < 0.5 else rng.uniform(20, 2000)
    slots = [1] * p if rng.random() < 0.5 else [rng.randint(1, 3) for _ in range(p)]
    factor = rng.choice([4.0, 1.0, 2.5])
    min_mem = min(max(_mems(costs, bounds, slots, factor)) for bounds in _splits(n, p))
    mode = rng.choice(["none", "loose", "exact", "between", "infeasible"])
    if mode == "infeasible" and min_mem < 2:
        mode = "none"
    cap = {"none": None, "loose": 10 ** 9, "exact": min_mem, "between": min_mem + rng.uniform(0, 2000),
           "infeasible": min_mem - rng.choice([1, 0.5, max(1, min_mem // 3)])}[mode]
    return n, p, costs, bw, slots, factor, min_mem, mode, cap


# ---------------------------------------------------------------------------------------------------- optimality


def test_time_method_is_optimal_against_brute_force():
    rng = random.Random(1234)
    seen: dict[str, int] = {}
    for _ in range(500):
        n, p, costs, bw, slots, factor, min_mem, mode, cap = _random_request(rng)
        seen[mode] = seen.get(mode, 0) + 1
        feasible = [b for b in _splits(n, p) if cap is None or max(_mems(costs, b, slots, factor)) <= cap]
        if mode == "infeasible":
            assert not feasible
            with pytest.raises(PartitionError) as e:
                partition(costs, p, "time", memory_cap=cap, bandwidth=bw, slots=slots, state_factor=factor)
            assert _min_cap_in(e.value) == min_mem
            continue
        plan = partition(costs, p, "time", memory_cap=cap, bandwidth=bw, slots=slots, state_factor=factor)
        _check_shape(plan, n, p)
        value = {tuple(b): max(stage_time(costs, s, e, bw) for s, e in b) for b in feasible}
        best = min(value.values())
        assert plan.bottleneck == pytest.approx(best, rel=1e-9, abs=1e-12)
        # Documented tie-break: the earliest cut list among (rounding-)equal optima.
        first = next(b for b in feasible if value[tuple(b)] <= best + 1e-12 * best)
        assert plan.stages == first
        assert plan.stage_times == [stage_time(costs, a, b, bw) for a, b in plan.stages]
        assert plan.stage_memory == _mems(costs, plan.stages, slots, factor)
        if cap is not None:
            assert max(plan.stage_memory) <= cap
    assert all(seen.get(m, 0) >= 40 for m in ("none", "loose", "exact", "between", "infeasible")), seen


def test_params_method_is_optimal_against_brute_force():
    rng = random.Random(99)
    for _ in range(300):
        n, p, costs, bw, slots, factor, min_mem, mode, cap = _random_request(rng)
        if mode == "infeasible":
            with pytest.raises(PartitionError) as e:
                partition(costs, p, "params", memory_cap=cap, bandwidth=bw, slots=slots, state_factor=factor)
            assert _min_cap_in(e.value) == min_mem
            continue
        plan = partition(costs, p, "params", memory_cap=cap, bandwidth=bw, slots=slots, state_factor=factor)
        _check_shape(plan, n, p)
        best = min(max(sum(c.param_bytes for c in costs[a:b]) for a, b in bounds) for bounds in _splits(n, p)
                   if cap is None or max(_mems(costs, bounds, slots, factor)) <= cap)
        assert max(sum(c.param_bytes for c in costs[a:b]) for a, b in plan.stages) == best
        # Scored with the same time model as "time", so it can never look better than the time optimum.
        assert plan.bottleneck >= partition(costs, p, "time", memory_cap=cap, bandwidth=bw, slots=slots,
                                            state_factor=factor).bottleneck * (1 - 1e-12)
        if cap is not None:
            assert max(plan.stage_memory) <= cap


def test_uniform_counts_differ_by_at_most_one_and_extras_come_first():
    costs = _rand_costs(random.Random(5), 13)
    for n in range(1, 14):
        for p in range(1, n + 1):
            plan = partition(costs[:n], p, "uniform")
            _check_shape(plan, n, p)
            sizes = [b - a for a, b in plan.stages]
            assert max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)
            assert sizes.count(n // p + 1) == n % p


def test_uniform_over_memory_cap_is_an_error():
    costs = [LayerCost("big", 1.0, 1000, 0), LayerCost("small", 1.0, 1, 0)]
    with pytest.raises(PartitionError, match=r"uniform split: stage 0 .*above memory_cap"):
        partition(costs, 2, "uniform", memory_cap=2000)
    assert partition(costs, 2, "uniform", memory_cap=4000).stages == [(0, 1), (1, 2)]


def test_time_balance_beats_param_balance_and_uniform():
    # An embedding-like block: heavy but cheap. Param balancing isolates it, uniform ignores cost; time balances.
    times, params = [1.0, 3.0, 3.0, 1.0, 1.0], [1000, 1, 1, 1, 1]
    costs = [LayerCost(f"b{i}", t, p, 0) for i, (t, p) in enumerate(zip(times, params))]
    by_time, by_params, uniform = (partition(costs, 2, m) for m in ("time", "params", "uniform"))
    assert by_time.stages == [(0, 2), (2, 5)] and by_time.bottleneck == 5.0
    assert uniform.stages == [(0, 3), (3, 5)] and uniform.bottleneck == 7.0
    assert by_params.stages == [(0, 1), (1, 5)] and by_params.bottleneck == 8.0
    assert by_time.lower_bound == 4.5
    assert by_time.stage_layers(0) == ["b0", "b1"] and by_time.layer_names == [f"b{i}" for i in range(5)]


def test_balance_is_one_for_equal_divisible_blocks():
    costs = [LayerCost(f"b{i}", 2.0, 10, 10) for i in range(8)]
    for p in (1, 2, 4, 8):
        plan = partition(costs, p)
        assert plan.balance == 1.0 and plan.bottleneck == plan.lower_bound == 16.0 / p
    assert partition(costs, 3).balance > 1.0


def test_balance_of_all_zero_costs():
    costs = [LayerCost(f"b{i}", 0.0, 0, 0) for i in range(3)]
    assert partition(costs, 2).balance == 1.0


def test_large_chain_is_fast_and_no_worse_than_uniform():
    costs = _rand_costs(random.Random(7), 200)
    plan = partition(costs, 8, bandwidth=1e3)
    _check_shape(plan, 200, 8)
    assert plan.bottleneck <= partition(costs, 8, "uniform", bandwidth=1e3).bottleneck


# ---------------------------------------------------------------------------------------------------- cost model


def test_stage_time_and_memory_formulas():
    costs = [LayerCost("a", 1.0, 10, 100), LayerCost("b", 2.0, 20, 200, saved_bytes=50), LayerCost("c", 4.0, 40, 300)]
    assert stage_time(costs, 0, 3) == 7.0
    assert stage_time(costs, 0, 3, bandwidth=100.0) == 7.0  # one stage: no cuts, no transfer
    assert stage_time(costs, 1, 2, bandwidth=100.0) == 2.0 + 2 * 100 / 100 + 2 * 200 / 100  # both cuts charged
    assert stage_time(costs, 0, 1, bandwidth=100.0) == 1.0 + 2 * 100 / 100
    assert stage_time(costs, 2, 3, bandwidth=100.0) == 4.0 + 2 * 200 / 100
    assert stage_memory(costs, 0, 3) == 4 * 70 + (100 + 50 + 300)  # saved_bytes replaces act_bytes when given
    assert stage_memory(costs, 0, 2, slots=3, state_factor=1.0) == 30 + 3 * 150
    with pytest.raises(PartitionError, match=r"\[2, 2\)"):
        stage_time(costs, 2, 2)
    with pytest.raises(PartitionError, match=r"\[0, 4\)"):
        stage_memory(costs, 0, 4)


def test_transfer_cost_avoids_cutting_after_a_huge_activation():
    # b2 is free (think pooling) and shrinks the activation: cutting after b1 or after b2 balances compute equally.
    costs = [LayerCost("b0", 1.0, 0, 10), LayerCost("b1", 1.0, 0, 10 ** 9), LayerCost("b2", 0.0, 0, 10),
             LayerCost("b3", 1.0, 0, 10), LayerCost("b4", 1.0, 0, 10)]
    assert partition(costs, 2).stages == [(0, 2), (2, 5)]  # no transfer cost: the tie goes to the earliest cut
    plan = partition(costs, 2, bandwidth=1e9)
    assert plan.stages == [(0, 3), (3, 5)]
    assert plan.stage_times == [2.0 + 2 * 10 / 1e9] * 2 and plan.bandwidth == 1e9


def test_a_slightly_better_later_cut_beats_an_earlier_one():
    # Cutting after b1 costs 2 + 2e-7, after b2 costs 2 + 1e-7: the tie-break must not swallow real differences.
    costs = [LayerCost(f"b{i}", t, 0, 0) for i, t in enumerate([1.0, 1.0, 1e-7, 1.0, 1.0 + 1e-7])]
    assert partition(costs, 2).stages == [(0, 3), (3, 5)]


def test_slots_charge_activations_per_stage():
    # With 1F1B-style slots the first stage holds more activations, so under a cap it must take fewer blocks.
    costs = [LayerCost(f"b{i}", 1.0, 0, 100) for i in range(4)]
    assert partition(costs, 2, memory_cap=200).stages == [(0, 2), (2, 4)]
    plan = partition(costs, 2, memory_cap=300, slots=[3, 1])
    assert plan.stages == [(0, 1), (1, 4)] and plan.stage_memory == [300, 300]


# ---------------------------------------------------------------------------------------------------- plan files


def _plan() -> Plan:
    return partition(_rand_costs(random.Random(3), 6), 3, bandwidth=123.0, memory_cap=10 ** 9, slots=[3, 2, 1])


def test_plan_json_round_trip(tmp_path):
    plan = _plan()
    path = tmp_path / "new" / "dir" / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text()) == plan.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left behind
    loaded = Plan.load(path)
    assert loaded == plan and loaded.to_dict() == plan.to_dict()
    assert Plan.from_dict(plan.to_dict()) == plan
    plan.save(path)  # overwriting is fine
    assert Plan.load(path) == plan


def test_plan_without_bandwidth_round_trips(tmp_path):
    plan = partition([LayerCost("x", 1.0, 1, 1)], 1)
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").bandwidth is None


@pytest.mark.parametrize("content, what", [
    (None, "no such file"),
    ("", "not valid JSON"),
    ("TRUNCATE", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"method": "time"}', "missing key"),
    ("\xff\xfe", "cannot read"),
])
def test_load_bad_files_names_the_path(tmp_path, content, what):
    path = tmp_path / "plan.json"
    if content == "TRUNCATE":
        _plan().save(path)
        path.write_text(path.read_text()[:50])
    elif content == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\xfa")
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PartitionError) as e:
        Plan.load(path)
    assert str(e.value).startswith(f"pipeline plan {path}: ") and what in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, what", [
    (lambda d: d.update(stages=[[0, 2], [3, 6]]), "contiguous"),
    (lambda d: d.update(stages=[[0, 2], [2, 5]]), "cover"),
    (lambda d: d.update(stages=[[0, 0], [0, 6]]), "is empty"),
    (lambda d: d.update(stages=[[0, 6]]), "stage_times"),
    (lambda d: d.update(stages="0-6"), "stages = '0-6'"),
    (lambda d: d.update(method="fast"), "method = 'fast'"),
    (lambda d: d["costs"][1].update(time_s=-1.0), "time_s = -1.0"),
    (lambda d: d["costs"][1].pop("act_bytes"), "costs[1]"),
    (lambda d: d.update(stage_memory=[1, 2]), "stage_memory"),
    (lambda d: d.update(bottleneck="slow"), "bottleneck = 'slow'"),
    (lambda d: d.update(bandwidth=-5), "bandwidth = -5"),
])
def test_from_dict_rejects_bad_content(tmp_path, edit, what):
    d = _plan().to_dict()
    edit(d)
    with pytest.raises(PartitionError, match=re.escape(what)):
        Plan.from_dict(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PartitionError, match=re.escape(f"pipeline plan {path}: ")):
        Plan.load(path)


def test_check_matches(tmp_path):
    plan = _plan()
    plan.check_matches(plan.layer_names, 3)
    with pytest.raises(PartitionError, match=r"made for 6 blocks, the model has 5"):
        plan.check_matches(plan.layer_names[:5], 3)
    other = plan.layer_names[:2] + ["other"] + plan.layer_names[3:]
    with pytest.raises(PartitionError, match=r"block 2 is 'b2' in the plan, 'other' in the model"):
        plan.check_matches(other, 3)
    with pytest.raises(PartitionError, match=r"has 3 stages, the run asks for 2"):
        plan.check_matches(plan.layer_names, 2)
    path = tmp_path / "plan.json"
    plan.save(path)
    with pytest.raises(PartitionError, match=re.escape(f"plan {path} has 3 stages, the run asks for 4")):
        Plan.load(path).check_matches(plan.layer_names, 4)


# ---------------------------------------------------------------------------------------------------- errors


_FOUR = [LayerCost(f"b{i}", 1.0, 100, 10) for i in range(4)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(costs=[], stages=1), "no blocks to partition"),
    (dict(stages=0), "pipeline stages = 0: allowed 1..4"),
    (dict(stages=-2), "pipeline stages = -2: allowed 1..4"),
    (dict(stages=2.5), "pipeline stages = 2.5"),
    (dict(stages=5), "more pipeline stages (5) than blocks (4): allowed 1..4"),
    (dict(method="fastest"), "unknown partition method 'fastest': allowed time, params, uniform"),
    (dict(costs=[LayerCost("x", math.nan, 1, 1)]), "block 0 ('x') time_s = nan"),
    (dict(costs=[LayerCost("x", math.inf, 1, 1)]), "block 0 ('x') time_s = inf"),
    (dict(costs=[LayerCost("x", -0.5, 1, 1)]), "block 0 ('x') time_s = -0.5"),
    (dict(costs=[LayerCost("x", 1.0, -1, 1)]), "block 0 ('x') param_bytes = -1"),
    (dict(costs=[LayerCost("x", 1.0, 1, -3)]), "block 0 ('x') act_bytes = -3"),
    (dict(costs=[LayerCost("x", 1.0, 1, 1, -4)]), "block 0 ('x') saved_bytes = -4"),
    (dict(costs=[LayerCost("x", 1.0, 1.5, 1)]), "block 0 ('x') param_bytes = 1.5"),
    (dict(slots=[1, 1, 1]), "slots has 3 entries for 2 stages"),
    (dict(slots=[1, 0]), "slots[1] = 0: must be an integer >= 1"),
    (dict(memory_cap=0), "memory_cap = 0: must be a number of bytes > 0"),
    (dict(memory_cap=-1.5), "memory_cap = -1.5"),
    (dict(bandwidth=0), "bandwidth = 0"),
    (dict(bandwidth=math.nan), "bandwidth = nan"),
    (dict(state_factor=-1), "state_factor = -1"),
])
def test_errors_name_the_value(kwargs, message):
    args = dict(costs=_FOUR, stages=2)
    args.update(kwargs)
    costs, stages = args.pop("costs"), args.pop("stages")
    with pytest.raises(PartitionError) as e:
        partition(costs, stages, **args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_infeasible_cap_reports_cap_and_smallest_cap_in_gib():
    gib = 1 << 30
    costs = [LayerCost(f"b{i}", 1.0, gib, 0) for i in range(4)]  # 4 GiB of state per block at state_factor 4
    with pytest.raises(PartitionError) as e:
        partition(costs, 2, memory_cap=6 * gib)
    msg = str(e.value)
    assert "memory_cap 6 GiB (6442450944 bytes)" in msg and "smallest cap that fits is 8 GiB" in msg
    assert partition(costs, 2, memory_cap=8 * gib).stages == [(0, 2), (2, 4)]


def test_module_does_not_import_torch_or_mpi():
    code = ("import sys, hpctrain.pipeline.partition; "
            "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules and 'horovod' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
