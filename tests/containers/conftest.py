"""The CPU image, built once per definition/installer change (tests/containers/rootfs.py) and cached; the
apptainer stand-in; a small Slurm test cluster for the image's batch job."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.containers import rootfs
from tests.launch import ROOT
from tests.packages import apt_install
from tests.slurm_cluster import SlurmCluster, ensure_installed

DEFINITION = ROOT / "containers" / "hpctrain.def"
CUDA_DEFINITION = ROOT / "containers" / "hpctrain-cuda.def"
STANDIN = rootfs.STANDIN
# The build's Horovod wheel cache (like a CI cache: the first build compiles Horovod into it).
WHEEL_CACHE = Path.home() / ".cache" / "hpctrain" / "container-wheels"
# This machine's only source of the lock's torch==2.13.0+cpu (a centre's build uses PyTorch's CPU index).
LOCAL_WHEELS = Path("/opt/wheels")
IMAGE_PYTHON = "/opt/venv/bin/python"


def build_settings() -> tuple[dict, list]:
    args, binds = {}, [(WHEEL_CACHE, "/var/cache/hpctrain-wheels", "rw")]
    if any(LOCAL_WHEELS.glob("torch-*.whl")):
        args = {"TORCH_INDEX": "", "WHEELS": "/wheels"}
        binds.append((LOCAL_WHEELS, "/wheels", "ro"))
    # This host reaches PyPI through a TLS-inspecting proxy whose CA is in the host's bundle (PIP_CERT).
    ca = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    if ca and Path(ca).is_file():
        args["CA_BUNDLE"] = "/etc/hpctrain-build-ca.crt"
        binds.append((Path(ca), "/etc/hpctrain-build-ca.crt", "ro"))
    return args, binds


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("building and entering the image root needs root (debootstrap, bubblewrap binds, apt inside)")


@pytest.fixture(scope="session")
def image():
    _need_root()
    args, binds = build_settings()
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    b = rootfs.build(DEFINITION, args, binds, log=lambda m: print(m, file=sys.stderr))
    took = time.monotonic() - t0
    r = b.record
    how = (f"built now in {took:.0f} s (debootstrap {r['base_debootstrap_s']} s, %post {r['post_s']} s, "
           f"%test {r['test_s']} s; Horovod compiled: {r['horovod_built_from_source']})"
           if b.built else f"from the cache in {took:.1f} s (built {r['built_at']} in {r['total_s']} s)")
    print(f"\ncontainer root {b.root}: {r['root_bytes'] / 1e9:.2f} GB, {how}", file=sys.stderr)
    out = os.environ.get("HPCTRAIN_CONTAINER_RECORD")
    if out:
        _record(Path(out), b, took)
    return b


def _record(path: Path, b: rootfs.Build, took: float) -> None:
    """Build figures for benchmarks/results (make container-check): the last cold build is kept."""
    old = json.loads(path.read_text()) if path.exists() else {}
    r = {k: v for k, v in b.record.items() if k not in ("test_output_tail",)}
    cold = r["base_debootstrap_s"] > 0 and r["horovod_built_from_source"]
    data = {**old, "machine": f"{os.cpu_count()} cores, Debian 12 host (debootstrap root, bubblewrap)",
            "root_size_gb": round(r["root_bytes"] / 1e9, 2), "last_build": r}
    if cold:
        data["cold_build"] = r
    if not b.built:
        data["cached_fixture_s"] = round(took, 2)
    path.write_text(json.dumps(data, indent=2) + "\n")


def charliecloud(image: rootfs.Build | None = None) -> Path | None:
    """Charliecloud from Debian's packages when missing (ch-run; ch-convert with mksquashfs). Given a built image:
    its SquashFS form made by `ch-convert` (what a centre without Apptainer keeps and runs), once per built root,
    kept beside it in the cache."""
    _need_root()
    missing = [pkg for pkg, tool in (("charliecloud-runtime", "ch-run"), ("charliecloud-builders", "ch-convert"),
                                     ("squashfs-tools", "mksquashfs")) if not shutil.which(tool)]
    apt_install(missing, "charliecloud")
    if image is None:
        return None
    squash = image.root.with_name(image.root.name + ".sqfs")
    if not squash.exists():
        partial = squash.with_name(squash.name + ".partial.sqfs")
        partial.unlink(missing_ok=True)
        t0 = time.monotonic()
        subprocess.run(["ch-convert", "-i", "dir", "-o", "squash", str(image.root), str(partial)], check=True,
                       env=dict(os.environ, USER="root"), capture_output=True, timeout=1800)
        partial.rename(squash)
        print(f"\nch-convert: {image.root.name} -> SquashFS {squash.stat().st_size / 1e9:.2f} GB in "
              f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    return squash


def standin(action: str, root: Path, *args: str, opts: tuple = (), timeout: float = 300, cwd: Path = ROOT,
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(STANDIN), action, *opts, str(root), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def image_ranks(root: Path, run_dir: Path) -> list[psutil.Process]:
    """The training ranks of `run_dir` that run the image's interpreter, with torch loaded from the image's
    venv: /proc/PID/exe is the image root's python file (same inode), the maps name /opt/venv's torch."""
    image_python = os.stat(root / "usr" / "bin" / "python3.11")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if not any("hpctrain." in c for c in cmd) or str(run_dir) not in cmd:
                continue
            exe = os.stat(f"/proc/{p.pid}/exe")
            maps = Path(f"/proc/{p.pid}/maps").read_text()
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if (exe.st_dev, exe.st_ino) == (image_python.st_dev, image_python.st_ino) and \
                "/opt/venv/lib/python3.11/site-packages/torch/" in maps:
            found.append(p)
    return found


@pytest.fixture(scope="module")
def slurm2():
    """A 2-node Slurm test cluster of its own (tests/slurm's 8-node one is session-wide and lives there)."""
    _need_root()
    ensure_installed(log=lambda m: print(m, file=sys.stderr))
    base = Path(tempfile.mkdtemp(prefix="hpctrain-slurm-img-"))  # short: socket paths under it
    cluster = SlurmCluster(base, nodes=2)
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)
