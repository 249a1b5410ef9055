"""What of hpctrain-cuda.def can be checked without its base image, PyTorch's CUDA index or a GPU: what its
%post hands to install.sh, and that the lock it installs exists for its Python. The base (Ubuntu 24.04) has
Python 3.12, the lock was resolved on 3.11;
pip resolves every pinned package for CPython 3.12 on manylinux x86_64 (metadata only, nothing installed) and
the file it picks must carry one of the lock's hashes. torch is left out (the CUDA build comes from PyTorch's
index, which the check does not query), Horovod, mpi4py and python-hostlist too (built from their sdists in the image;
python-hostlist is pure Python and published only as an sdist)."""
import json
import os
import re
import subprocess
import sys

import pytest
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from tests.containers.deffile import load
from tests.launch import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import lock_select

LOCK = ROOT / "requirements" / "lock.txt"
SDIST_ONLY = {"horovod", "torch", "mpi4py", "python-hostlist"}  # not wheels from PyPI for the image's Python
# glibc 2.39 (Ubuntu 24.04) runs every manylinux wheel up to manylinux_2_39; the legacy names given too.
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
CP312 = {*cpython_tags((3, 12), platforms=PLATFORMS), *compatible_tags((3, 12), "cp312", PLATFORMS)}


@pytest.mark.parametrize("frameworks", ["torch", "torch,tf"])
def test_lock_has_a_hashed_wheel_of_every_package_for_the_cuda_images_python(frameworks, tmp_path):
    text = lock_select.select(LOCK.read_text(), lock_select.frameworks(frameworks), SDIST_ONLY)
    wanted = {name: set(re.findall(r"--hash=sha256:([0-9a-f]{64})", "".join(lines)))
              for name, lines in lock_select.blocks(text) if name}
    req = tmp_path / "lock.txt"
    req.write_text(text)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    # PIP_CONFIG_FILE=/dev/null: only PyPI, whatever indexes or constraints a user's pip config adds.
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                        *platforms, "--target", str(tmp_path / "t"), "--report", str(tmp_path / "report.json"),
                        "-r", str(req)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PIP_CONFIG_FILE": "/dev/null"})
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    got = {lock_select.normalise(i["metadata"]["name"]): i for i in report["install"]}
    assert set(got) == set(wanted), set(wanted) ^ set(got)
    for name, item in got.items():
        url = item["download_info"]["url"]
        assert item["download_info"]["archive_info"]["hashes"]["sha256"] in wanted[name], (name, url)
        assert parse_wheel_filename(url.rsplit("/", 1)[-1])[3] & CP312, (name, url)


@pytest.mark.parametrize("frameworks, tf", [("torch", None), ("torch,tf", "tensorflow[and-cuda]==2.21.0")])
def test_cuda_post_sets_install_sh_cuda_switches_from_the_lock(frameworks, tf):
    # The %post as written, up to the step that needs the CUDA base (ldconfig of its stubs), run by sh with the
    # repository's lock in place of /opt/hpctrain's: what it hands to install.sh.
    post = load(ROOT / "containers" / "hpctrain-cuda.def", {"FRAMEWORKS": frameworks}).body("post")
    prefix = post[:post.index("    ldconfig /usr/local/cuda")].replace("/opt/hpctrain/requirements/lock.txt", str(LOCK))
    p = subprocess.run(["sh", "-c", prefix + '\nenv -0'], capture_output=True, text=True, timeout=30,
                       env={"PATH": os.environ["PATH"], "APPTAINER_LABELS": "/dev/null"})
    assert p.returncode == 0, p.stderr
    got = dict(v.split("=", 1) for v in p.stdout.split("\0") if "=" in v)
    assert got["HPCTRAIN_TORCH"] == "torch==2.13.0" and got["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu12")
    assert got.get("HPCTRAIN_TF") == tf and got["HPCTRAIN_FRAMEWORKS"] == frameworks
    assert (got["HOROVOD_GPU_OPERATIONS"], got["HPCTRAIN_VENV"]) == ("NCCL", "/opt/venv")
