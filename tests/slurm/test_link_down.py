"""A node's link goes down for good in the middle of a supervised Slurm job (the test cluster's nodes are hosts
with their own links: tests.network.hosts). The ranks' hang watchdogs end the step's tasks; srun, which never
hears from the cut-off node, is ended by the supervisor once that node's slurmd cannot be reached; the step is
relaunched in the same allocation on the spare node instead and resumes from the last checkpoint."""
import sys
import time

from tests.slurm.conftest import diagnostics, job_info, sbatch, wait_for_job
from tests.slurm.test_restart import (
    RESTART_LINE,
    TEMPLATE,
    TINY,
    _after_train_step,
    _nodes,
    _records,
    _step_ranks,
    _wait,
)

HANG = 10  # --hang-timeout
STEP_END_WAIT = 10  # HPCTRAIN_STEP_END_WAIT


def _node_state(cluster, node: str) -> str:
    return cluster.run("sinfo", "-h", "-n", node, "-o", "%t", check=False).stdout.strip()


def test_link_down_node_replaced_by_the_spare(slurm, tmp_path):
    # 5 nodes, 1 spare, --no-kill (Slurm keeps the job when the lost node is declared DOWN). 512 samples / 4 / 8
    # = 16 steps, a checkpoint every 3.
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm, ["--nodes=5", "--no-kill", "--output", str(out), TEMPLATE, *TINY, "--synthetic-size", "512",
                         "--checkpoint-every", "3", "--hang-timeout", str(HANG), "--run-dir", str(run_dir)],
                 HPCTRAIN_SITE="testcluster", HPCTRAIN_SPARE_NODES="1", HPCTRAIN_STEP_END_WAIT=str(STEP_END_WAIT))
    first = _step_ranks(run_dir, 0, 4, slurm, job, out)
    info = job_info(slurm, job)
    allocated = _nodes(slurm, info["NodeList"])
    victim = next(r for r in first if r["node"] != info["BatchHost"])  # not the node srun and the supervisor run on
    spare = set(allocated) - {r["node"] for r in first}
    _after_train_step(run_dir, 4, slurm, job, out)
    t_down = time.time()
    slurm.hosts.link_down(victim["node"])
    try:
        second = _step_ranks(run_dir, 1, 4, slurm, job, out, timeout=HANG + STEP_END_WAIT + 60)
        t_relaunch = time.time()
        again = _wait("training again", lambda: [r for r in _records(run_dir) if r["time"] > t_relaunch], 180,
                      slurm, job, out, every=0.2)
        info = wait_for_job(slurm, job, timeout=300, output=out)
    finally:
        slurm.hosts.link_up(victim["node"])
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), diagnostics(slurm, out)
    assert f"node(s) {victim['node']} cannot be reached" in text, text[-3000:]
    lines = RESTART_LINE.findall(text)
    assert len(lines) == 1, text[-3000:]
    k, most, code, cause, blamed, excluded, saved, trained, lost = lines[0]
    assert (code, blamed, excluded) == ("86", victim["node"], victim["node"]), lines
    assert victim["node"] not in {r["node"] for r in second} and spare <= {r["node"] for r in second}
    assert [r["step"] for r in _records(run_dir)] == list(range(1, 17)) and text.count("done at step 16") == 1
    step_end = t_relaunch - t_down
    assert step_end < HANG + 30 + 15, f"relaunched {step_end:.1f} s after the link went down"
    # The node comes back by itself once its link is up (ReturnToService=2): the cluster is whole again.
    deadline = time.monotonic() + 90
    while _node_state(slurm, victim["node"]) not in ("idle", "alloc", "mix") and time.monotonic() < deadline:
        time.sleep(1)
    assert _node_state(slurm, victim["node"]) in ("idle", "alloc", "mix"), _node_state(slurm, victim["node"])
    print(f"\nlink down: {victim['node']} (rank {victim['rank']}) cut off after train step 4 (--hang-timeout {HANG}, "
          f"HPCTRAIN_STEP_END_WAIT {STEP_END_WAIT}): -> relaunched on {','.join(sorted(r['node'] for r in second))} "
          f"{step_end:.1f} s, -> training again {again[0]['time'] - t_down:.1f} s (step {again[0]['step']}), "
          f"last checkpoint {saved}, steps lost {lost}", file=sys.stderr)
