"""The command lines the batch templates build with an image set, from HPCTRAIN_DRY_RUN=1 (slurm/env.sh):
the real templates and site files, run by bash outside Slurm, print their srun line and exit 0."""
import shlex
import subprocess
import sys

import pytest

from tests.containers.conftest import STANDIN
from tests.launch import ROOT, env

PREFIX = "hpctrain: dry run: "


def dry_run(template: str, *args: str, cwd=ROOT, **extra) -> tuple[subprocess.CompletedProcess, list[str]]:
    e = env()
    e.update({"HPCTRAIN_DRY_RUN": "1", **extra})
    p = subprocess.run(["bash", str(ROOT / "slurm" / template), *args], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=60)
    lines = [ln[len(PREFIX):] for ln in p.stdout.splitlines() if ln.startswith(PREFIX)]
    return p, shlex.split(lines[0]) if len(lines) == 1 else []


def test_testcluster_with_image_uses_the_apptainer_command_and_the_images_python(tmp_path):
    image = tmp_path / "hpctrain-root"
    p, cmd = dry_run("resnet_8node.sh", "--config", "configs/tiny.toml", HPCTRAIN_SITE="testcluster",
                     HPCTRAIN_IMAGE=str(image), HPCTRAIN_APPTAINER=str(STANDIN))
    assert p.returncode == 0, p.stderr
    assert cmd == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", str(STANDIN), "exec", str(image), "python3",
                   "-m", "hpctrain.resnet", "--config", "configs/tiny.toml"]


def test_charliecloud_runtime_uses_ch_run_with_the_site_s_binds_and_the_image_s_venv(tmp_path):
    image = tmp_path / "hpctrain-root"
    p, cmd = dry_run("resnet_8node.sh", "--config", "configs/tiny.toml", HPCTRAIN_SITE="testcluster",
                     HPCTRAIN_IMAGE=str(image), HPCTRAIN_CONTAINER_RUNTIME="charliecloud")
    assert p.returncode == 0, p.stderr
    assert cmd == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "ch-run", "-b", "/tmp", "-c", "/opt/hpctrain",
                   str(image), "--", "/opt/venv/bin/python", "-m", "hpctrain.resnet", "--config", "configs/tiny.toml"]
    p, cmd = dry_run("resnet_8node.sh", HPCTRAIN_SITE="default", HPCTRAIN_IMAGE="/images/h.sqfs",
                     HPCTRAIN_CONTAINER_RUNTIME="docker")
    assert p.returncode == 2 and cmd == [], p.stdout
    assert p.stderr.strip().splitlines()[-1] == ("hpctrain: error: HPCTRAIN_CONTAINER_RUNTIME='docker' is not allowed "
                                                 "(allowed: apptainer, charliecloud)")


def test_testcluster_without_image_runs_the_repository_venv():
    p, cmd = dry_run("resnet_8node.sh", "--max-steps", "3", HPCTRAIN_SITE="testcluster")
    assert p.returncode == 0, p.stderr
    assert cmd == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", f"{ROOT}/.venv/bin/python", "-m", "hpctrain.resnet",
                   "--max-steps", "3"]


MODULE = {"BASH_FUNC_module%%": '() { echo "module $*" >&2; }'}  # how Lmod hands `module` to a batch shell


def test_gpu_site_adds_nv_gpu_request_and_the_site_binds():
    p, cmd = dry_run("resnet_8node.sh", "--config", "configs/resnet50.toml", HPCTRAIN_SITE="example_gpu",
                     SLURM_JOB_NUM_NODES="2", HPCTRAIN_IMAGE_DIR="/images", SCRATCH="/scratch/me", **MODULE)
    assert p.returncode == 0 and "module load apptainer" in p.stderr, p.stderr
    assert cmd == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--ntasks-per-node=4", "--ntasks=8",
                   "--gpus-per-node=4", "apptainer", "exec", "--nv", "--bind", "/scratch/me", "/images/hpctrain.sif",
                   "python3", "-m", "hpctrain.resnet", "--config", "configs/resnet50.toml"]


def test_cpu_site_with_image_has_no_nv():
    p, cmd = dry_run("bert_multinode.sh", HPCTRAIN_SITE="default", HPCTRAIN_IMAGE="/images/h.sif")
    assert p.returncode == 0, p.stderr
    assert cmd[:6] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "apptainer", "exec", "/images/h.sif"]
    assert "--nv" not in cmd and cmd[6:9] == ["python3", "-m", "hpctrain.bert"]


def test_bind_options_are_split_on_blanks_and_never_globbed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    binds = f"--bind {tmp_path}/* --bind /data:/data:ro,/ckpt"
    p, cmd = dry_run("resnet_8node.sh", HPCTRAIN_SITE="default", HPCTRAIN_IMAGE="/i.sif",
                     HPCTRAIN_APPTAINER_ARGS=binds)
    assert p.returncode == 0, p.stderr
    assert cmd[3:10] == ["apptainer", "exec", "--bind", f"{tmp_path}/*", "--bind", "/data:/data:ro,/ckpt", "/i.sif"]


def test_rendered_script_dry_runs_the_same_way(tmp_path):
    # python -m hpctrain.slurm renders the header only; the rendered job builds the same line.
    r = subprocess.run([sys.executable, "-m", "hpctrain.slurm", "--nodes", "2", "--site", "example_gpu"], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "job.sh"
    script.write_text(r.stdout)
    e = env()
    e.update(HPCTRAIN_DRY_RUN="1", HPCTRAIN_ROOT=str(ROOT), HPCTRAIN_SITE="example_gpu", SLURM_JOB_NUM_NODES="2",
             HPCTRAIN_IMAGE="/images/x.sif", **MODULE)
    p = subprocess.run(["bash", str(script), "--config", "c.toml"], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith(PREFIX))
    assert "--gpus-per-node=4 apptainer exec --nv --bind" in line and "/images/x.sif python3 -m hpctrain.resnet" in line


@pytest.mark.parametrize("value", ["yes", "2", " 1"])
def test_bad_dry_run_value_is_one_line(value):
    p, cmd = dry_run("resnet_8node.sh", HPCTRAIN_SITE="default", HPCTRAIN_DRY_RUN=value)
    assert p.returncode == 2 and cmd == []
    assert p.stderr == f"hpctrain: error: HPCTRAIN_DRY_RUN='{value}' is not allowed (allowed: 0, 1)\n"
