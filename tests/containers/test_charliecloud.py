"""The image under a real HPC container runtime: Charliecloud's `ch-run` (Debian's charliecloud-runtime), the
hybrid MPI model with the host's mpirun. ch-run passes the host environment and nothing of Apptainer's
`%environment`: what the image's Open MPI needs there (no CMA single copy across the ranks' user namespaces,
PMIx's hash store) hpctrain sets itself (hpctrain.image). Without it, the ranks hang in their first large
collective: that hang now ends within --startup-timeout. The built root also converts to a SquashFS image
(`ch-convert`, what a centre without Apptainer keeps) that ch-run runs directly."""
import json
import shutil
import signal
import subprocess
import sys
import time

from tests.containers.conftest import IMAGE_PYTHON, charliecloud, image_ranks
from tests.launch import ROOT, env, finish, metrics, trained, wait_for

TINY = ["--config", "configs/tiny.toml"]


def mpirun(image_path, run_dir, *args: str, extra: tuple = ()) -> list[str]:
    """The host's mpirun starting 2 ranks, each in its own ch-run of the image; the run dir bound at /mnt."""
    return [shutil.which("mpirun"), "-np", "2", "--oversubscribe", "--bind-to", "none", *extra,
            "ch-run", "-b", f"{run_dir}:/mnt", "-c", "/opt/hpctrain", str(image_path), "--",
            IMAGE_PYTHON, "-m", "hpctrain.resnet", *TINY, "--run-dir", "/mnt/run", *args]


def ch_env() -> dict:
    e = env()
    e.update(USER="root", OMP_NUM_THREADS="1")  # ch-run refuses to start without USER
    return e


def test_host_mpirun_trains_under_ch_run_and_resumes_after_a_forwarded_sigusr1(image, tmp_path):
    charliecloud()
    run_dir = tmp_path / "run"  # /mnt/run inside
    cmd = mpirun(image.root, tmp_path, "--synthetic-size", "512", "--preempt-check-every", "2")
    job = subprocess.Popen(cmd, cwd=ROOT, env=ch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Both ranks run the image's python and torch (ch-run's root is the image directory itself).
        assert wait_for(lambda: trained(run_dir, 3) and len(image_ranks(image.root, "/mnt/run")) == 2, timeout=240), \
            "no 2 ranks training inside the image"
        job.send_signal(signal.SIGUSR1)  # mpirun forwards it to ch-run, which passes it to the rank
    finally:
        first = finish(job, timeout=240)
    assert job.returncode == 85, first[-3000:]
    stop = int(first.split("stopping at step ")[1].split()[0])
    t0 = time.monotonic()
    rerun = subprocess.run(cmd, cwd=ROOT, env=ch_env(), capture_output=True, text=True, timeout=300)
    in_image = time.monotonic() - t0
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-3000:]
    assert f"ckpt-{stop:08d}.pt at step {stop}" in text and "done at step 32" in text
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 33))  # none lost or repeated
    # The same steps on the host (the repository's venv, from the same checkpoint): ch-run's cost.
    host = [shutil.which("mpirun"), "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable, "-m",
            "hpctrain.resnet", *TINY, "--synthetic-size", "512", "--run-dir", str(tmp_path / "bare"),
            "--resume", str(run_dir / "checkpoints" / f"ckpt-{stop:08d}.pt")]
    t0 = time.monotonic()
    bare = subprocess.run(host, cwd=ROOT, env=ch_env(), capture_output=True, text=True, timeout=300)
    on_host = time.monotonic() - t0
    assert bare.returncode == 0, bare.stdout[-2000:] + bare.stderr[-2000:]
    print(f"\nsteps {stop + 1}..32 with 2 ranks: ch-run {in_image:.1f} s, bare metal {on_host:.1f} s", file=sys.stderr)


def test_without_the_image_settings_the_first_collective_hangs_and_start_up_ends_it(image, tmp_path):
    # HPCTRAIN_IMAGE_SETTINGS=off: the process keeps what ch-run gave it, Open MPI picks CMA single copy, and
    # rank 0's first large message (the state broadcast) never completes. --startup-timeout 15 ends it.
    charliecloud()
    t0 = time.monotonic()
    p = subprocess.run(mpirun(image.root, tmp_path, "--max-steps", "2", "--startup-timeout", "15",
                              extra=("-x", "HPCTRAIN_IMAGE_SETTINGS=off")),
                       cwd=ROOT, env=ch_env(), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 86, out[-3000:]
    assert "waiting in the start-up collective 'the broadcast of rank 0's model state'" in out, out[-3000:]
    hang = json.loads((tmp_path / "run" / "hang-0.json").read_text())
    assert hang["collective"] == "the broadcast of rank 0's model state" and hang["limit"] == 15
    assert took < 15 + 45, f"{took:.0f} s"
    print(f"\nch-run without the image settings: first collective hung, exit 86 after {took:.1f} s "
          "(startup timeout 15 s; the start-up allowance would be 30 min)", file=sys.stderr)


def test_doctor_in_the_image_names_the_runtime_and_the_settings_it_lacked(image, tmp_path):
    charliecloud()
    cmd = [shutil.which("mpirun"), "-np", "2", "--oversubscribe", "--bind-to", "none", "ch-run", "-b",
           f"{tmp_path}:/mnt", "-c", "/opt/hpctrain", str(image.root), "--", IMAGE_PYTHON, "-m", "hpctrain.doctor",
           "--run-dir", "/mnt/run"]
    p = subprocess.run(cmd, cwd=ROOT, env=ch_env(), capture_output=True, text=True, timeout=300)
    line = next((ln for ln in p.stdout.splitlines() if "container:" in ln), "")
    assert line.startswith("WARN  container: charliecloud: its environment lacks"), p.stdout[-3000:] + p.stderr[-2000:]
    for setting in ("OMPI_MCA_btl_vader_single_copy_mechanism=none", "PMIX_MCA_gds=hash", "OPENBLAS_NUM_THREADS=1"):
        assert setting in line
    assert "PASS  horovod allreduce" in p.stdout and "PASS  mpi4py broadcast" in p.stdout  # and MPI works with them


def test_the_root_converts_to_a_squashfs_image_that_ch_run_runs(image, tmp_path):
    squash = charliecloud(image)  # ch-convert dir -> SquashFS, once per built root (kept beside it)
    assert squash.stat().st_size > 100e6
    p = subprocess.run(mpirun(squash, tmp_path, "--max-steps", "3"), cwd=ROOT, env=ch_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "done at step 3" in p.stdout and (tmp_path / "run" / "checkpoints" / "ckpt-00000003.pt").exists()
