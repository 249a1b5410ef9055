"""The CPU definition built for real (Debian 12 root, %post = scripts/install.sh, %test), and what is Apptainer's
own: its `%test`, `%environment` (with and without --cleanenv), `%runscript` and the options a centre's command
lines use. These go through tests/containers/apptainer-standin, a bubblewrap stand-in for `apptainer` (no
apptainer binary exists for Debian 12 or on PyPI): the one part here that is not the real program. Training in
the image under a real HPC runtime (Charliecloud's ch-run, with the host's mpirun and on Slurm) is in
test_charliecloud.py and test_image_slurm.py."""
import json
import subprocess

from tests.containers.conftest import IMAGE_PYTHON, STANDIN, standin
from tests.launch import ROOT, env

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


def test_image_python_is_not_the_hosts(image):
    # What image_ranks relies on: the image's interpreter is its own file, not the host's.
    assert (image.root / IMAGE_PYTHON.lstrip("/")).exists()
    host = (ROOT / ".venv" / "bin" / "python").resolve().stat()
    mine = (image.root / "usr" / "bin" / "python3.11").stat()
    assert (host.st_dev, host.st_ino) != (mine.st_dev, mine.st_ino)
