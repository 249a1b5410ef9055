"""The unchanged batch template on a real Slurm cluster with the image under a real HPC container runtime:
HPCTRAIN_IMAGE = the built root directory, HPCTRAIN_CONTAINER_RUNTIME = charliecloud (the site setting that
makes the template's container line `ch-run ... IMAGE --`). srun --mpi=pmix starts each rank in its own ch-run of
the image; they train, are preempted (USR1), requeue and resume, with no MPI setting from the runtime."""
import re
import time

from tests.containers.conftest import charliecloud, image_ranks
from tests.launch import ROOT, metrics, trained
from tests.slurm.conftest import diagnostics, job_info, sbatch, wait_for_job

TEMPLATE = str(ROOT / "slurm" / "resnet_8node.sh")


def test_template_in_image_trains_is_preempted_requeues_and_resumes(image, slurm2, tmp_path):
    # 2 nodes (sbatch --nodes overrides the template's 8); 512 samples / 2 ranks / batch 8 = 32 steps.
    charliecloud()
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(slurm2, ["--nodes", "2", "--output", str(out), TEMPLATE, "--config", "configs/tiny.toml",
                          "--synthetic-size", "512", "--preempt-check-every", "2", "--run-dir", str(run_dir)],
                 HPCTRAIN_SITE="testcluster", HPCTRAIN_IMAGE=str(image.root), HPCTRAIN_CONTAINER_RUNTIME="charliecloud")
    in_image = set()
    deadline = time.monotonic() + 300
    while not (trained(run_dir, 3) and len(in_image) == 2):
        assert time.monotonic() < deadline, "no 2 ranks training inside the image\n" + diagnostics(slurm2, out)
        assert job_info(slurm2, job)["JobState"] in ("PENDING", "RUNNING"), diagnostics(slurm2, out)
        in_image |= {p.pid for p in image_ranks(image.root, run_dir)}
        time.sleep(0.5)
    slurm2.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_for_job(slurm2, job, timeout=420, output=out)
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), diagnostics(slurm2, out)
    assert "hpctrain.resnet: slurm launcher, 2 rank(s) on 2 node(s)" in text
    stop = int(text.split("stopping at step ")[1].split()[0])
    assert 3 <= stop < 32 and stop % 2 == 0, text[-3000:]
    expected = ["restart 0 on 2 node(s)", "batch script got SIGUSR1",
                f"stopping at step {stop} on SIGUSR1: checkpoint saved",
                "exit 85 (requeue or rerun the same command to resume)", f"requeueing job {job}",
                "restart 1 on 2 node(s)", f"ckpt-{stop:08d}.pt at step {stop}", "done at step 32"]
    positions = [text.find(e) for e in expected]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(expected, positions))
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 33))  # none lost or repeated
    assert (run_dir / "checkpoints" / "ckpt-00000032.pt").exists()


def test_host_pmix_plugin_and_image_pmix_have_the_same_major(image, slurm2):
    # The two one-line checks of containers/README.md, on this cluster: srun's PMIx plugin and the image's label.
    plugins = slurm2.run("srun", "--mpi=list").stdout + slurm2.run("srun", "--mpi=list").stderr
    host_major = re.search(r"pmix_v(\d+)", plugins)
    assert host_major, plugins
    assert image.record["labels"]["org.hpctrain.pmix"].split(".")[0] == host_major.group(1)
