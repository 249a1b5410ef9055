"""The synchronization strategies (hpctrain.sync) under real ranks, each against its reference case, float64. Every
variant runs in one mpirun per engine (worker_sync.py: horovod, mpi and ddp backends in one process;
worker_tf_sync.py: the TF engine's horovod backend); the workers check and report the differences they measured.

Gossip on 4 ranks runs the mixing alone (worker_sync.py --only gossip).

Tolerances: "exact" = 1e-12 absolute on float64 weights of order 0.1-1 (sums taken in another order);
everything measured so far is 0.0 or within 3e-16."""
from tests.launch import run
from tests.parallel.test_multirank import _ok_lines

BACKENDS = ("horovod", "mpi", "ddp")
EXACT = 1e-12


def test_torch_strategies_equal_their_references():
    res = _ok_lines(run("mpirun", 2, ["tests/parallel/worker_sync.py"], timeout=400), 2)
    for r in res.values():
        local, power, zero, traffic = r["local_sgd"], r["powersgd"], r["zero"], r["traffic"]
        gossip = r["gossip"]
        for b in BACKENDS:
            for graph in ("ring", "exponential"):  # gossip on 2 ranks == local SGD K=1; one model a step; resume
                assert gossip[f"{graph}_vs_local_sgd_{b}"] < EXACT and gossip[f"{graph}_resume_diff_{b}"] < EXACT
                assert gossip[f"{graph}_bytes_per_step_{b}"] == gossip["ring_bytes_per_step_mpi"] > 0
            # local SGD, K=1, plain SGD == allreduce SGD; K=4: a resume across an average is exact
            assert local[f"k1_vs_allreduce_{b}"] < EXACT and local[f"k4_resume_diff_{b}"] < EXACT
            # PowerSGD at full rank == allreduce; error feedback survives a resume, and matters
            assert power[f"full_rank_vs_allreduce_{b}"] < 1e-10
            assert power[f"resume_diff_{b}"] < EXACT < 1e-8 < power[f"without_state_diff_{b}"]
            for opt in ("sgd", "adamw"):  # ZeRO-1 == unsharded, half the state, whole-model checkpoints both ways
                assert zero[f"{opt}_diff_{b}"] < EXACT and zero[f"{opt}_resume_diff_{b}"] < EXACT
                assert zero[f"{opt}_format_diff_{b}"] < EXACT and 0.3 < zero[f"{opt}_state_share_{b}"] < 0.7
        for b in ("horovod", "mpi"):  # our PowerSGD over Horovod / MPI == torch's powerSGD_hook over DDP
            assert power[f"vs_torch_hook_{b}"] < 1e-10
            # our ZeRO with accumulation, and with a loss scaler skipping one rank's overflow on every rank
            assert zero[f"accumulate2_diff_{b}"] < EXACT and zero[f"scaler_diff_{b}"] < EXACT
        params = traffic["params_bytes"]
        assert all(traffic[f"allreduce_{b}"] == params for b in BACKENDS)
        assert traffic["powersgd_mpi"] == traffic["powersgd_horovod"] == traffic["powersgd_ddp"] < params
        assert params < traffic["zero_mpi"] == traffic["zero_horovod"] <= params * 1.5 + 8


def test_gossip_on_4_ranks_keeps_the_mean_and_shrinks_the_spread():
    res = _ok_lines(run("mpirun", 4, ["tests/parallel/worker_sync.py", "--only", "gossip"], timeout=300), 4)
    for r in res.values():
        g = r["gossip"]
        exponential, ring = g["exponential_spreads"], g["ring_spreads"]
        assert exponential[0] > 1 and exponential[2] < EXACT  # the exact average after log2(4) = 2 steps
        assert ring[0] > 1 and all(b < a for a, b in zip(ring, ring[1:])) and ring[-1] > EXACT
        assert g["ring_consensus_at_save"] > EXACT  # a save measured how far apart the ranks were, then averaged


def test_tf_local_sgd_equals_its_references():
    res = _ok_lines(run("mpirun", 2, ["tests/parallel/worker_tf_sync.py"], timeout=400), 2)
    for r in res.values():
        assert r["k1_vs_allreduce"] < EXACT and r["k4_resume_diff"] < EXACT
        assert r["bytes_per_sync"] > r["bytes_per_warmup_step"] > 0  # the model (+ BN statistics) vs its gradients
