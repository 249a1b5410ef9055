"""hpctrain.sync and its configuration: local SGD's schedule (torch's counting), the byte counter and its window
metrics, the start-line words, the [sync] options and every combination refused in one line; PowerSGD's split of a
bucket and its orthogonalization (engine/torch/sync/powersgd.py), one process."""
import subprocess
import sys

import pytest
import torch

from hpctrain.config import ConfigError, TrainConfig, parse
from hpctrain.metrics import Traffic, window_metrics
from hpctrain.sync import Policy, Schedule, gossip_exchanges


def test_schedule_counts_like_torch_post_local_sgd():
    # PostLocalSGDState: gradient allreduce while iter < start; PeriodicModelAverager after the optimizer step when
    # step >= warmup and (step - warmup) % period == 0, both counting from 0.
    s = Schedule(period=4, warmup=2)
    assert [s.allreduces_gradients(i) for i in range(4)] == [True, True, False, False]
    assert [i for i in range(16) if s.averages_after(i)] == [2, 6, 10, 14]
    assert [i for i in range(5) if Schedule(1).averages_after(i)] == [0, 1, 2, 3, 4]


def test_traffic_counts_syncs_and_pauses():
    t = Traffic()
    t.add(100)
    with t.sync():
        t.add(40)
    with t.paused():
        t.add(1000)  # a checkpoint's consolidation: not training traffic
        with t.sync():
            t.add(7)
    t.distance("peer_distance", 0.5)
    t.distance("peer_distance", 1.5)
    assert t.take() == [140.0, 40.0, 1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0] and t.take() == [0.0] * 9
    # summed over 2 ranks, a window of 10 steps -> per rank, per step, per average
    assert window_metrics([280.0, 80.0, 2.0], 10, 2) == {"sent_bytes": 140.0, "sent_bytes_per_step": 14.0,
                                                          "syncs": 1.0, "sent_bytes_per_sync": 40.0}
    assert window_metrics([280.0, 0.0, 0.0], 10, 2) == {"sent_bytes": 140.0, "sent_bytes_per_step": 14.0}
    # distances: the mean over every rank's values in the window; absent where none was taken
    assert window_metrics([280.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0], 10, 2) == {
        "sent_bytes": 140.0, "sent_bytes_per_step": 14.0, "peer_distance": 0.75}


def test_traffic_histograms_per_row():
    t = Traffic()
    with pytest.raises(ValueError, match="unknown histogram 'lag'; known: staleness_histogram"):
        t.histogram("lag", 2, 3)
    t.histogram("staleness_histogram", 2, 3)
    for row, value in [(0, 0), (0, 1), (1, 0), (1, 7), (1, 2)]:  # 7: past the last bin, counted in it
        t.count("staleness_histogram", row, value)
    taken = t.take()
    assert taken[9:] == [1.0, 1.0, 0.0, 1.0, 0.0, 2.0] and t.take()[9:] == [0.0] * 6
    shapes = t.shapes()
    assert shapes == [("staleness_histogram", 2, 3)]
    # summed over 2 servers; trailing bins empty in every row dropped; none counted: absent
    summed = [0.0] * 9 + [3.0, 1.0, 0.0, 2.0, 0.0, 0.0]
    assert window_metrics(summed, 1, 2, shapes)["staleness_histogram"] == [[3, 1], [2, 0]]
    assert "staleness_histogram" not in window_metrics([0.0] * 15, 1, 2, shapes)


def test_policy_from_config_and_its_words():
    assert Policy.of(TrainConfig()).default and Policy.of(object()).default
    cfg = parse(["--sync", "local-sgd", "--sync-period", "8", "--sync-warmup", "100"], "t")
    p = Policy.of(cfg)
    assert (p.strategy, p.period, p.warmup, p.schedule) == ("local-sgd", 8, 100, Schedule(8, 100))
    assert p.describe() == "local SGD: the model averaged every 8 step(s) after 100 step(s) of gradient allreduce"
    p = Policy.of(parse(["--sync", "powersgd", "--powersgd-rank", "4", "--powersgd-warm-start", "false"], "t"))
    assert p.describe() == "PowerSGD rank 4 from step 10 (error feedback)"
    p = Policy.of(parse(["--sync", "gossip", "--gossip-graph", "ring"], "t"))
    assert (p.strategy, p.gossip_graph) == ("gossip", "ring") and "its two ring neighbours" in p.describe()
    p = Policy.of(parse(["--sync", "ps", "--ps-mode", "async", "--staleness", "3"], "t"))
    assert (p.ps_mode, p.staleness) == ("async", 3) and p.describe().endswith(
        "asynchronously: each gradient applied on arrival, a worker at most 3 step(s) ahead of the slowest")
    assert Policy.of(parse(["--sync", "gossip"], "t")).gossip_graph == "exponential"
    p = Policy.of(parse(["--sync", "ps", "--ps-servers", "2"], "t"))
    assert p.ps_servers == 2 and p.describe().startswith("parameter server: the last 2 rank(s) hold the weights")
    zero = Policy.of(parse(["--zero"], "t"))
    assert zero.describe() == "allreduce of every gradient, ZeRO-1 (optimizer state sharded)"


def test_sync_section_in_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[sync]\nstrategy = "powersgd"\npowersgd_rank = 1\npowersgd_start = 50\n')
    s = parse(["--config", str(f)], "t").sync
    assert (s.strategy, s.powersgd_rank, s.powersgd_start, s.zero) == ("powersgd", 1, 50, False)
    assert TrainConfig().to_dict()["sync"]["strategy"] == "allreduce"


TF = ["--framework", "tf"]


@pytest.mark.parametrize("argv, words", [
    (["--sync", "push"], "sync.strategy (--sync): 'push' is not allowed (allowed: allreduce, local-sgd, powersgd, "
                         "gossip, ps)"),
    (["--sync", "gossip", "--gossip-graph", "star"], "sync.gossip_graph (--gossip-graph): 'star' is not allowed "
                                                     "(allowed: exponential, ring)"),
    (["--sync", "gossip", "--pipeline-stages", "2"], "sync (--sync gossip): not supported with --pipeline-stages 2"),
    (["--sync", "gossip", "--backend", "none"], "sync (--sync gossip): needs several ranks on a data-parallel backend"),
    ([*TF, "--sync", "gossip"], "sync (--sync gossip): PyTorch-only"),
    ([*TF, "--sync", "ps"], "sync (--sync ps): PyTorch-only"),
    (["--sync", "ps", "--ps-servers", "0"], "sync.ps_servers (--ps-servers): 0 is below the minimum 1"),
    (["--sync", "ps", "--ps-mode", "eventually"], "sync.ps_mode (--ps-mode): 'eventually' is not allowed (allowed: "
                                                  "sync, async)"),
    (["--sync", "ps", "--staleness", "-1"], "sync.staleness (--staleness): -1 is below the minimum 0"),
    (["--sync", "ps", "--pipeline-stages", "2"], "sync (--sync ps): not supported with --pipeline-stages 2"),
    (["--sync", "ps", "--amp", "fp16"], "dist.amp (--amp): 'fp16' loss scaling is not supported with --sync ps "
                                        "(allowed there: none, bf16)"),
    (["--sync", "gossip", "--zero"], "sync.zero (--zero): shards the optimizer state of an allreduce step, not with "
                                     "--sync gossip"),
    (["--sync-period", "0"], "sync.period (--sync-period): 0 is below the minimum 1"),
    (["--sync", "local-sgd", "--adasum"], "dist.adasum (--adasum): combines every gradient each step, not with --sync "
                                          "local-sgd (allowed with it: --sync allreduce, no --zero)"),
    (["--sync", "powersgd", "--fp16-allreduce"], "dist.fp16_allreduce (--fp16-allreduce): combines every gradient each "
                                                 "step, not with --sync powersgd"),
    (["--zero", "--adasum"], "not with --sync allreduce --zero"),
    (["--zero", "--sync", "local-sgd"], "sync.zero (--zero): shards the optimizer state of an allreduce step, not with "
                                        "--sync local-sgd (allowed with --zero: --sync allreduce)"),
    (["--sync", "local-sgd", "--pipeline-stages", "2"],
     "sync (--sync local-sgd): not supported with --pipeline-stages 2 (allowed there: --sync allreduce, no --zero)"),
    (["--zero", "--backend", "none"],
     "needs several ranks on a data-parallel backend (allowed: --backend horovod, ddp, mpi; with --backend none: "
     "--sync allreduce, no --zero)"),
    ([*TF, "--sync", "powersgd"], "sync (--sync powersgd): PyTorch-only (allowed with --framework tf: --sync "
                                  "allreduce, local-sgd; local-sgd on --backend horovod)"),
    ([*TF, "--zero"], "sync (--sync allreduce --zero): PyTorch-only"),
    ([*TF, "--backend", "multiworker", "--sync", "local-sgd"], "'local-sgd' with --framework tf needs --backend "
                                                               "horovod, not 'multiworker'"),
    (["--sync", "powersgd", "--powersgd-start", "1"], "sync.powersgd_start (--powersgd-start): 1 with error feedback "
                                                      "or warm start (allowed: 2 or more"),
])
def test_bad_sync_combinations_are_one_line(argv, words):
    with pytest.raises(ConfigError) as e:
        parse(argv, "t")
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [
    ["--sync", "local-sgd", "--backend", "ddp"], ["--sync", "local-sgd", "--backend", "mpi", "--accumulate", "2"],
    ["--sync", "powersgd", "--powersgd-start", "0", "--powersgd-error-feedback", "false",
     "--powersgd-warm-start", "false"],
    ["--zero", "--backend", "ddp", "--amp", "bf16"], [*TF, "--sync", "local-sgd", "--sync-period", "1"],
])
def test_good_sync_combinations(argv):
    parse(argv, "t")


def test_a_bad_combination_exits_2_with_one_line_before_torch_loads():
    p = subprocess.run([sys.executable, "-m", "hpctrain.resnet", "--zero", "--sync", "powersgd"], capture_output=True,
                       text=True, timeout=60)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "(allowed with --zero: --sync allreduce)" in lines[0], p.stderr


def test_powersgd_layout_groups_by_shape_as_torch_does():
    from hpctrain.engine.torch.sync.powersgd import layout
    shapes = [(3,), (3, 16), (16,), (16, 16), (16,), (16, 8), (16, 16, 3, 3)]
    whole, compressed = layout(shapes, rank=2)
    # sent whole: vectors and the 3 x 16 matrix ((3 + 16) x 2 x 2 >= 48); compressed in first-shape-first groups
    assert whole == [0, 1, 2, 4]
    assert compressed == [(3, 16, 16, 2), (5, 16, 8, 2), (6, 16, 144, 2)]
    assert layout(shapes, rank=2, min_rate=0)[0] == []  # min rate 0: everything, vectors as n x 1


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_orthogonalize_gives_orthonormal_columns(rank):
    from hpctrain.engine.torch.sync.powersgd import orthogonalize
    m = torch.randn(3, 10, rank, dtype=torch.float64)
    orthogonalize(m)
    eye = torch.eye(rank, dtype=torch.float64).expand(3, rank, rank)
    assert torch.allclose(m.transpose(1, 2) @ m, eye, atol=1e-12)


def mixing_matrix(size: int, step: int, graph: str):
    """W[i, j]: the weight of rank j's model in rank i's after the step's exchanges (the plain mean)."""
    w = [[0.0] * size for _ in range(size)]
    for i in range(size):
        sources = [source for _, source in gossip_exchanges(i, size, step, graph)]
        for j in [i, *sources]:
            w[i][j] += 1 / (len(sources) + 1)
    return w


@pytest.mark.parametrize("graph", ["ring", "exponential"])
@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_gossip_mixing_is_doubly_stochastic_and_pairs_every_send_with_a_receive(size, graph):
    for step in range(6):
        w = mixing_matrix(size, step, graph)
        assert all(abs(sum(row) - 1) < 1e-12 for row in w)  # each rank: a mean
        assert all(abs(sum(w[i][j] for i in range(size)) - 1) < 1e-12 for j in range(size))  # the average kept
        sends = [(i, dest) for i in range(size) for dest, _ in gossip_exchanges(i, size, step, graph)]
        receives = [(source, i) for i in range(size) for _, source in gossip_exchanges(i, size, step, graph)]
        assert sorted(sends) == sorted(receives)  # every Sendrecv finds its partner: no deadlock


@pytest.mark.parametrize("size", [2, 4, 8, 16])
def test_exponential_graph_averages_exactly_in_log2_steps(size):
    x = [float(i * i) for i in range(size)]
    for step in range(size.bit_length() - 1):
        w = mixing_matrix(size, step, "exponential")
        x = [sum(w[i][j] * x[j] for j in range(size)) for i in range(size)]
    assert max(x) - min(x) < 1e-9 and abs(x[0] - sum(i * i for i in range(size)) / size) < 1e-9
    assert gossip_exchanges(0, 1, 0, "ring") == [] and gossip_exchanges(1, 2, 0, "ring") == [(0, 0)]
