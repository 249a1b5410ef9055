"""The straggler watch's rule (hpctrain.stragglers), one process."""
import pytest

from hpctrain.stragglers import Watch, slowest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("busy, found", [
    ([0.10, 0.11, 0.30, 0.10], (2, 0.30, 0.10)),  # 3x the others' median
    ([0.10, 0.25], (1, 0.25, 0.10)),              # 2 ranks: against the other one
    ([0.10, 0.12, 0.14, 0.11], None),             # ordinary spread
    ([0.010, 0.011, 0.025], None),                # 2.4x, but 15 ms: jitter of short steps
    ([0.3], None),
])
def test_slowest(busy, found):
    got = slowest(busy)
    assert (got if got is None else (got[0], *map(lambda v: round(v, 3), got[1:]))) == found


def test_watch_names_a_straggler_once_then_its_recovery():
    w = Watch(["n1", "n2", "n3"])
    figures, line = w.window([0.1, 0.1, 0.4], 1, 10, quiet=True)  # the warm-up window: figures only
    assert line is None and figures == {"busy_s_per_step_median": 0.1, "busy_s_per_step_max": 0.4,
                                        "straggler_rank": 2}
    assert w.window([0.1, 0.1, 0.4], 11, 20)[1] is None  # seen once: not yet
    figures, line = w.window([0.1, 0.1, 0.4], 21, 30)
    assert line == ("straggler: rank 2 on node n3 was busy 0.4 s per step, 4.0x the other ranks' median 0.1 s "
                    "(steps 21..30); the others wait for it at every gradient exchange")
    assert w.window([0.1, 0.1, 0.4], 31, 35)[1] is None  # the same straggler: said once
    assert w.window([0.5, 0.1, 0.1], 31, 40)[1] is None  # another one, in one window: not yet
    assert "rank 0 on node n1" in w.window([0.5, 0.1, 0.1], 41, 50)[1]  # in two: said
    figures, line = w.window([0.1, 0.1, 0.1], 51, 60)
    assert line == "straggler gone: rank 0 on node n1 is busy like the others again (steps 51..60)"
    assert "straggler_rank" not in figures
    assert w.window([0.1, 0.4, 0.1], 61, 70)[1] is None and w.window([0.1, 0.1, 0.1], 71, 80)[1] is None  # one blip
    assert w.window([0.1, float("nan"), 0.4], 81, 90)[0]["busy_s_per_step_median"] == 0.25  # a server: not timed
