"""GPipe and 1F1B op lists: every micro-batch forward then backward once, the activation bound, no
deadlock, and the makespan both reach with equal stages: (M + P - 1) x (f + b)."""
import pytest

from hpctrain.pipeline.schedule import activation_slots, ops_for, peak_in_flight, simulate


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_each_micro_batch_forward_then_backward_once(schedule):
    for P in range(1, 7):
        for M in range(1, 9):
            for s in range(P):
                ops = ops_for(schedule, P, M, s)
                assert sorted(ops) == sorted([("F", i) for i in range(M)] + [("B", i) for i in range(M)])
                assert [i for k, i in ops if k == "B"] == list(range(M))  # same order as accumulation
                assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(M))


def test_activation_bound():
    for P in range(1, 7):
        for M in range(1, 9):
            assert activation_slots("1f1b", P, M) == [min(P - s, M) for s in range(P)]
            assert activation_slots("gpipe", P, M) == [M] * P
    assert peak_in_flight([("F", 0), ("B", 0), ("F", 1), ("F", 2), ("B", 1)]) == 2


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_makespan_with_equal_stages(schedule):
    f, b = 1.0, 2.0
    for P in range(1, 6):
        for M in range(1, 9):
            assert simulate(schedule, P, M, [f] * P, [b] * P) == pytest.approx((M + P - 1) * (f + b))


def test_slowest_stage_bounds_the_makespan():
    fwd, bwd = [1.0, 3.0, 1.0], [2.0, 6.0, 2.0]
    t = simulate("1f1b", 3, 8, fwd, bwd)
    assert t >= 8 * (3.0 + 6.0) and t <= (8 + 2) * (3.0 + 6.0)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="allowed: 1f1b, gpipe"):
        ops_for("zb", 2, 2, 0)
