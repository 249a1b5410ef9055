"""benchmarks/scaling.py's bookkeeping on made-up rates: which np=1 row is each row's T(1), what a row that
cannot run at np=1 does to its efficiency and ratios, and the ceiling column. (The smoke runs measure real
rows at np=2; these rules are about np=1, which they no longer run for every group.)"""
import argparse

import pytest

from benchmarks import scaling


def row(engine, n, total):
    return {"engine": engine, "np": n, "samples_per_s_total": total}


def test_tf_multiworker_at_one_rank_is_skipped_with_its_reason():
    with pytest.raises(scaling.Skipped, match="needs >= 2 workers"):
        scaling.tf_multiworker_rate(1, argparse.Namespace())


@pytest.mark.parametrize("engine", ["sync_gossip", "sync_ps", "sync_ps_async"])
def test_strategies_without_a_peer_at_one_rank_are_skipped(engine):
    with pytest.raises(scaling.Skipped, match=">= 2 ranks"):
        scaling.two_or_more_rate(1, argparse.Namespace(), engine)


def test_tf_rows_efficiency_and_ratios():
    rows = [row("tf_horovod", 1, 10.0), row("tf_multiworker", 1, None), row("tf_mirrored", 1, 8.0),
            row("tf_horovod", 2, 16.0), row("tf_multiworker", 2, 12.0), row("tf_mirrored", 2, 18.0)]
    scaling.score(rows)
    by = {(r["engine"], r["np"]): r for r in rows}
    assert by["tf_horovod", 2]["efficiency"] == pytest.approx(0.8)
    assert by["tf_mirrored", 2]["efficiency"] == pytest.approx(18.0 / 16.0)
    # no one-worker run: its T(1) is tf_horovod's, and the row says so
    assert by["tf_multiworker", 2]["efficiency_baseline"] == "tf_horovod np=1"
    assert by["tf_multiworker", 2]["efficiency"] == pytest.approx(0.6)
    assert by["tf_multiworker", 1]["efficiency"] is None
    assert all(r["efficiency_vs_ceiling"] is None for r in rows)  # the ceiling is a torch step
    got = scaling.ratios(rows, range(1, 3))
    assert set(got["1"]) == {"tf_mirrored_vs_tf_horovod"}  # the skipped row drops only its own ratio
    assert got["2"] == pytest.approx({"tf_mirrored_vs_tf_horovod": 18.0 / 16.0, "tf_multiworker_vs_tf_horovod": 0.75})


def test_sync_rows_are_scored_against_plain_mpi_and_the_ceiling():
    rows = [row("hpctrain_mpi", 1, 50.0), row("sync_gossip", 1, None), row("ceiling_no_comm", 1, 52.0),
            row("hpctrain_mpi", 2, 80.0), row("sync_gossip", 2, 90.0), row("ceiling_no_comm", 2, 100.0)]
    scaling.score(rows)
    by = {(r["engine"], r["np"]): r for r in rows}
    assert by["sync_gossip", 2]["efficiency_baseline"] == "hpctrain_mpi np=1"
    assert by["sync_gossip", 2]["efficiency"] == pytest.approx(0.9)
    assert by["sync_gossip", 2]["efficiency_vs_ceiling"] == pytest.approx(0.9)
    assert by["hpctrain_mpi", 2]["efficiency_vs_ceiling"] == pytest.approx(0.8)
    assert by["ceiling_no_comm", 2]["efficiency_vs_ceiling"] == 1.0
    assert scaling.ratios(rows, range(1, 3))["2"]["ceiling_vs_linear"] == pytest.approx(100.0 / 104.0)


def test_without_an_np1_run_there_is_no_efficiency():
    rows = [row("tf_horovod", 2, 16.0), row("tf_multiworker", 2, 12.0)]
    scaling.score(rows)
    assert [(r["efficiency"], r["efficiency_baseline"]) for r in rows] == [(None, None), (None, None)]
    assert scaling.ratios(rows, [2])["2"] == pytest.approx({"tf_multiworker_vs_tf_horovod": 0.75})
