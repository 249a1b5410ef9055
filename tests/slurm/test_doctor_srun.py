"""`python -m hpctrain.doctor` as a 2-node job step on the real Slurm test cluster (srun --mpi=pmix), the nodes
two hosts with their own links."""
import subprocess
import sys
import time

from tests.integration.test_doctor import COLLECTIVES, checks
from tests.launch import ROOT
from tests.slurm.conftest import diagnostics, job_env


def test_doctor_under_srun_on_two_nodes(slurm, tmp_path):
    t0 = time.monotonic()
    p = subprocess.run(["srun", "--mpi=pmix", "-N", "2", "-n", "2", "--time", "3", sys.executable, "-m",
                        "hpctrain.doctor", "--run-dir", str(tmp_path / "run")],
                       cwd=ROOT, env=job_env(slurm, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    took = time.monotonic() - t0
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout}\n{p.stderr}\n{diagnostics(slurm)}"
    found = checks(p.stdout)  # every check once (rank 0 prints), one launch line
    assert found["ranks"] == ("PASS", "slurm launcher, 2 rank(s) on 2 node(s); mpi4py and Horovod agree")
    assert found["srun"][0] == "PASS" and "pmix" in found["srun"][1], found["srun"]
    for name in COLLECTIVES:
        assert found[name][0] == "PASS" and found[name][1].startswith("result correct; busbw"), (name, found[name])
    # The two nodes are hosts with their own links: the doctor measured each direction between them.
    assert found["network"][0] == "PASS" and "2 ring links between 2 nodes" in found["network"][1], found["network"]
    assert "node1 -> node2:" in p.stdout and "node2 -> node1:" in p.stdout
    assert found["run dir"][0] == "PASS"
    assert found["launch"][1].startswith("srun --mpi=pmix ") and found["launch"][1].endswith("-m hpctrain.resnet")
    print(f"\ndoctor under srun -N 2: {took:.1f} s\n{p.stdout}", file=sys.stderr)
