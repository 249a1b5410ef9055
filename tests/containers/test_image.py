"""The CPU definition built for real (Debian 12 root, %post = scripts/install.sh, %test) and used the way a
centre does: the host's mpirun starts the ranks inside the image (hybrid MPI model), they train, checkpoint,
stop on a forwarded SIGUSR1 and resume. The image is entered through tests/containers/apptainer-standin, a
bubblewrap stand-in for `apptainer exec` (no apptainer binary exists here): the one part not real."""
import json
import shutil
import signal
import subprocess

from tests.containers.conftest import IMAGE_PYTHON, STANDIN, image_ranks, standin
from tests.launch import ROOT, env, finish, metrics, trained, wait_for

TINY = ["--config", "configs/tiny.toml"]


def test_build_ran_install_sh_and_labels_record_the_versions(image):
    r, root = image.record, image.root
    labels = json.loads((root / ".singularity.d" / "labels.json").read_text())
    assert labels == r["labels"]
    assert labels["org.hpctrain.frameworks"] == "torch" and "org.hpctrain.tensorflow" not in labels
    assert labels["org.hpctrain.python"] == "3.11.2" and labels["org.hpctrain.torch"] == "2.13.0+cpu"
    assert labels["org.hpctrain.horovod"] == "0.28.1" and labels["org.hpctrain.openmpi"] == "4.1.4"
    assert labels["org.hpctrain.pmix"].startswith("4.2.")
    assert labels["org.hpctrain.mpi-model"].startswith("hybrid")  # the static %labels too
    assert r["post_s"] > 0 and r["test_s"] > 0 and r["test_output_tail"].count("allreduce sum 3.0") == 2
    # Torch only: the lock's TensorFlow-only packages are not there; the build leaves no caches behind.
    site = root / "opt" / "venv" / "lib" / "python3.11" / "site-packages"
    assert (site / "torch").is_dir() and (site / "horovod" / "torch").is_dir() and (site / "transformers").is_dir()
    assert not any((site / name).exists() for name in ("tensorflow", "keras", "keras_hub", "requests"))
    assert not (root / "root" / ".cache" / "pip").exists() and not (root / "var" / "cache" / "hpctrain-wheels").exists()
    assert not list((root / "var" / "lib" / "apt" / "lists").glob("*_Packages"))


def test_apptainer_test_passes_on_the_current_root(image):
    p = standin("test", image.root, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[X] PyTorch" in p.stdout and "[X] MPI" in p.stdout and "torch 2.13.0+cpu" in p.stdout
    assert sorted(ln for ln in p.stdout.splitlines() if "allreduce sum" in ln) == [
        "rank 0 of 2: allreduce sum 3.0", "rank 1 of 2: allreduce sum 3.0"]


def test_environment_and_runscript(image, tmp_path):
    e = env()
    e["HPCTRAIN_PROBE"] = "from-host"
    show = 'echo "$PATH"; command -v python; echo "$OMPI_MCA_btl_vader_single_copy_mechanism $PMIX_MCA_gds ' \
           '$OPENBLAS_NUM_THREADS ${HPCTRAIN_PROBE:-unset}"; cat /etc/debian_version; pwd'
    p = standin("exec", image.root, "sh", "-c", show, cwd=tmp_path, env=e)
    assert p.returncode == 0, p.stderr
    path, python, settings, debian, pwd = p.stdout.splitlines()
    assert path.startswith("/opt/venv/bin:") and python == "/opt/venv/bin/python"
    assert settings == "none hash 1 from-host" and debian.startswith("12.") and pwd == str(tmp_path)
    clean = standin("exec", image.root, "sh", "-c", show, opts=("--cleanenv",), cwd=tmp_path, env=e)
    assert clean.stdout.splitlines()[2].endswith(" unset")
    # %runscript: python -m hpctrain.ENTRY; anything else is one line and exit 2.
    ok = standin("run", image.root, "resnet", "--help", env=e)
    assert ok.returncode == 0 and "usage" in ok.stdout.lower(), ok.stderr
    bad = standin("run", image.root, "os", env=e)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert "hpctrain.sif: error: entry 'os' is not one of: resnet bert doctor slurm data.text" in bad.stderr


def test_standin_refuses_what_it_cannot_do(image, tmp_path):
    sif = tmp_path / "hpctrain.sif"
    sif.write_bytes(b"SIF")
    for args, words in [(["exec", str(sif), "true"], "is not a directory"),
                        (["exec", "--writable", str(image.root), "true"], "option '--writable' is not supported"),
                        (["exec", "--bind", "/no/such", str(image.root), "true"],
                         "bind source '/no/such' does not exist"),
                        (["shell", str(image.root)], "command 'shell' is not supported")]:
        p = subprocess.run([str(STANDIN), *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and words in p.stderr, (args, p.stderr)


def test_host_mpirun_trains_in_the_image_and_resumes_after_a_forwarded_sigusr1(image, tmp_path):
    # Hybrid model: the host's Open MPI 4.1 mpirun starts 2 ranks through the container command; their Open MPI
    # (the image's) joins the host launcher's PMIx. SIGUSR1 to mpirun is forwarded to the container processes
    # and by the stand-in to the ranks, which agree on a step, checkpoint and exit 85; the rerun resumes.
    # 512 samples / 2 ranks / batch 8 = 32 steps.
    run_dir = tmp_path / "run"
    mpirun = [shutil.which("mpirun"), "-np", "2", "--oversubscribe", "--bind-to", "none",
              str(STANDIN), "exec", str(image.root), "python", "-m", "hpctrain.resnet", *TINY, "--synthetic-size",
              "512", "--preempt-check-every", "2", "--run-dir", str(run_dir)]
    e = env()
    e["OMP_NUM_THREADS"] = "1"
    job = subprocess.Popen(mpirun, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Both ranks run the image's python with the image's torch (not the repository's venv) and train.
        assert wait_for(lambda: trained(run_dir, 3) and len(image_ranks(image.root, run_dir)) == 2, timeout=240), \
            "no 2 ranks training inside the image"
        job.send_signal(signal.SIGUSR1)
    finally:
        first = finish(job, timeout=240)
    assert job.returncode == 85, first[-3000:]
    stop = int(first.split("stopping at step ")[1].split()[0])
    assert "checkpoint saved" in first and stop % 2 == 0 and stop < 32
    rerun = subprocess.run(mpirun, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-3000:]
    assert f"ckpt-{stop:08d}.pt at step {stop}" in text and "done at step 32" in text
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 33))  # none lost or repeated
    assert (run_dir / "checkpoints" / "ckpt-00000032.pt").exists()


def test_image_python_is_not_the_hosts(image):
    # What image_ranks relies on: the image's interpreter is its own file, not the host's.
    assert (image.root / IMAGE_PYTHON.lstrip("/")).exists()
    host = (ROOT / ".venv" / "bin" / "python").resolve().stat()
    mine = (image.root / "usr" / "bin" / "python3.11").stat()
    assert (host.st_dev, host.st_ino) != (mine.st_dev, mine.st_ino)
