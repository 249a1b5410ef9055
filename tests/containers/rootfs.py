"""Build an Apptainer definition into a sandbox directory the way `apptainer build --sandbox` does, on a
machine without Apptainer: a Debian 12 root made by debootstrap stands in for `debian:12`, then %files are
copied, %post runs inside the root (bubblewrap: the root as /, host network), .singularity.d is written
(environment, runscript, test, labels.json) and %test runs through the bubblewrap stand-in of
`apptainer test` (apptainer-standin beside this file). The result is cached under
~/.cache/hpctrain/container-roots/<definition>-<key>, keyed on the rendered definition and every file the
build runs; a build happens in a temporary directory renamed into place only after %test passed.

    python -m tests.containers.rootfs containers/hpctrain.def [--build-arg K=V]... [--bind SRC:DST[:ro]]...
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.containers.deffile import Definition, DefinitionError, parse, render
from tests.packages import apt_install

ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).with_name("apptainer-standin")
CACHE = Path(os.environ.get("HPCTRAIN_CONTAINER_CACHE") or Path.home() / ".cache" / "hpctrain" / "container-roots")
# What `From:` may name here, and the debootstrap suite and mirror that stand in for it.
BASES = {"debian:12": ("bookworm", "http://deb.debian.org/debian")}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Everything the build runs besides the definition (the %files copies of the package code are refreshed
# on every use instead: they do not change what gets installed). BUILD_PROCEDURE: raise it when this file
# changes how a root is made (debootstrap options, %post environment, metadata layout).
KEY_FILES = ("scripts/install.sh", "scripts/lock_select.py", "scripts/cxx17-shim.sh", "requirements/lock.txt",
             "setup.cfg", "pyproject.toml")
BUILD_PROCEDURE = 3
KEEP_ROOTS = 2          # cached roots kept per definition (each a few GB)
NEED_FREE_GB = 8


@dataclass
class Build:
    root: Path
    record: dict
    built: bool         # False: taken from the cache


def ensure_tools(log=print) -> float:
    """debootstrap and bubblewrap from Debian's packages when missing; seconds spent."""
    missing = [pkg for pkg, tool in (("debootstrap", "debootstrap"), ("bubblewrap", "bwrap")) if not shutil.which(tool)]
    return apt_install(missing, "container build", log=log)


def cache_key(text: str) -> str:
    h = hashlib.sha256(f"procedure {BUILD_PROCEDURE}\n".encode() + text.encode())
    for rel in KEY_FILES:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one build at a time per cache (two test sessions, make targets)
        yield


def _run(cmd: list[str], log_file: Path, what: str, env: dict | None = None) -> None:
    with open(log_file, "a") as out:
        out.write(f"\n=== {what}: {' '.join(cmd)}\n")
        out.flush()
        p = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if p.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{what} failed (exit {p.returncode}); log {log_file}:\n{tail}")


def base_root(image: str, log=print) -> tuple[Path, float]:
    """A cached Debian root standing in for the docker image: (path, seconds spent making it now)."""
    suite, mirror = BASES[image]
    path = CACHE / f"base-{suite}-minbase"
    if (path / "etc" / "debian_version").exists():
        return path, 0.0
    t0 = time.monotonic()
    tmp = CACHE / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"container build: debootstrap --variant=minbase {suite} (stands in for docker://{image})")
    _run(["debootstrap", "--variant=minbase", suite, str(tmp), mirror], CACHE / f"{path.name}.log", "debootstrap")
    # The same package sources as the docker image (release, updates, security).
    (tmp / "etc/apt/sources.list").unlink(missing_ok=True)
    (tmp / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {suite} {suite}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: {suite}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    os.rename(tmp, path)
    return path, time.monotonic() - t0


def copy_files(d: Definition, root: Path, context: Path = ROOT) -> None:
    """%files as Apptainer copies host files: parents made, then `cp -fLr SRC DST` (links followed)."""
    for src, dst in d.files:
        target = root / dst.lstrip("/")
        if target.exists() or target.is_symlink():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-fLr", str(context / src), str(target)], check=True)


def _script(body: str, args: str) -> str:
    shell = args.split()[1] if args.startswith("-c") and len(args.split()) > 1 else "/bin/sh"
    return f"#!{shell}\n\n{body}"


def write_metadata(d: Definition, text: str, root: Path) -> None:
    """The sandbox layout Apptainer writes: /.singularity.d with env scripts, runscript, test, the definition."""
    meta = root / ".singularity.d"
    (meta / "env").mkdir(parents=True, exist_ok=True)
    (meta / "libs").mkdir(exist_ok=True)
    (meta / "env" / "10-docker2singularity.sh").write_text(f"#!/bin/sh\nexport PATH=\"{DEFAULT_PATH}\"\n")
    (meta / "env" / "90-environment.sh").write_text("#!/bin/sh\n# Custom environment shell code should follow\n\n"
                                                    + d.body("environment"))
    (meta / "env" / "91-environment.sh").touch()
    for name in ("runscript", "test"):
        f = meta / name
        f.write_text(_script(d.body(name), d.section_args.get(name, "")))
        f.chmod(0o755)
    (meta / "Singularity").write_text(text)
    for mount_point in ("etc/hosts", "etc/localtime", "etc/resolv.conf"):  # Apptainer binds the host's onto these
        f = root / mount_point
        if f.is_symlink():  # e.g. localtime -> zoneinfo without tzdata: never follow it out of the root
            f.unlink()
        if not f.exists():
            f.write_text("")
    for link, target in (("environment", ".singularity.d/env/90-environment.sh"),
                         ("singularity", ".singularity.d/runscript")):
        if not (root / link).is_symlink():
            (root / link).symlink_to(target)


def bind_args(binds) -> list[str]:
    out: list[str] = []
    for src, dst, mode in binds:
        out += ["--ro-bind" if mode == "ro" else "--bind", str(src), dst]
    return out


def run_post(d: Definition, root: Path, binds, log_file: Path) -> float:
    """%post inside the root: bubblewrap with the root as / (writable), host network, a clean environment."""
    (root / ".post.script").write_text(d.body("post"))
    labels = "/.build-labels"
    (root / labels.lstrip("/")).write_text("")
    made = [(src, root / dst.lstrip("/")) for src, dst, _ in binds if not (root / dst.lstrip("/")).exists()]
    for src, target in made:  # bubblewrap binds onto an existing file or directory
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch() if Path(src).is_file() else target.mkdir()
    shell = _script("", d.section_args.get("post", "")).split("\n")[0][2:]
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C", "TERM": "dumb", "APPTAINER_ROOTFS": "/",
           "APPTAINER_ENVIRONMENT": "/.singularity.d/env/91-environment.sh", "APPTAINER_LABELS": labels}
    env.update({k.replace("APPTAINER_", "SINGULARITY_"): v for k, v in list(env.items()) if k.startswith("APPTAINER_")})
    cmd = ["bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev", "--ro-bind", "/sys", "/sys",
           "--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf", *bind_args(binds), "--chdir", "/", "--clearenv",
           "--die-with-parent"]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    t0 = time.monotonic()
    _run([*cmd, shell, "-e", "/.post.script"], log_file, "%post")
    took = time.monotonic() - t0
    (root / ".post.script").unlink()
    for _, target in reversed(made):  # the mount points made for the build's binds are no part of the image
        if target.is_file() and target.stat().st_size == 0:
            target.unlink()
        elif target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    return took


def write_labels(d: Definition, root: Path) -> dict:
    dynamic = {}
    for line in (root / ".build-labels").read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            dynamic[key] = value.strip()
    (root / ".build-labels").unlink()
    labels = {"org.label-schema.schema-version": "1.0",
              "org.label-schema.build-date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "org.label-schema.usage.singularity.deffile.bootstrap": d.header.get("bootstrap", ""),
              "org.label-schema.usage.singularity.deffile.from": d.header.get("from", ""),
              "org.hpctrain.built-by": "tests/containers/rootfs.py (debootstrap + bubblewrap, not Apptainer)",
              **d.labels, **dynamic}
    (root / ".singularity.d" / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return labels


def run_test(root: Path, log_file: Path) -> tuple[float, str]:
    """%test as `apptainer test` runs it (here through the stand-in, clean environment, as root)."""
    t0 = time.monotonic()
    p = subprocess.run([str(STANDIN), "test", "--cleanenv", str(root)], capture_output=True, text=True, cwd="/",
                       stdin=subprocess.DEVNULL, timeout=600)
    with open(log_file, "a") as out:
        out.write(f"\n=== %test (exit {p.returncode})\n{p.stdout}{p.stderr}")
    if p.returncode != 0:
        raise RuntimeError(f"%test failed (exit {p.returncode}); log {log_file}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return time.monotonic() - t0, p.stdout + p.stderr


def size_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", "--one-file-system", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _prune(stem: str, keep: Path) -> None:
    others = sorted((p for p in CACHE.glob(f"{stem}-*") if p.is_dir() and p != keep), key=lambda p: p.stat().st_mtime)
    for old in others[:max(0, len(others) - (KEEP_ROOTS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
        for suffix in (".json", ".log", ".sqfs"):  # .sqfs: its SquashFS form (tests/containers/conftest.charliecloud)
            old.with_name(old.name + suffix).unlink(missing_ok=True)
    for stale in CACHE.glob(f".{stem}-*.build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for log in CACHE.glob(f"{stem}-*.log"):  # logs of failed builds
        if not log.with_suffix("").is_dir():
            log.unlink()


def build(def_path: Path | str, build_args: dict[str, str] | None = None, binds=(), log=print) -> Build:
    """The sandbox root of a definition: from the cache (its %files refreshed), or built now."""
    def_path = Path(def_path)
    text = render(def_path.read_text(), build_args, str(def_path))
    d = parse(text, str(def_path))
    image = d.header.get("from", "")
    if d.header["bootstrap"] != "docker" or image not in BASES:
        raise DefinitionError(f"{def_path}: 'Bootstrap: {d.header['bootstrap']}' 'From: {image}' cannot be built here "
                              f"(allowed: Bootstrap: docker with From: {', '.join(BASES)})")
    key = cache_key(text)
    name = f"{def_path.stem}-{key[:16]}"
    tools_s = ensure_tools(log)  # bubblewrap is needed to use a cached root too
    final, record_file, log_file = CACHE / name, CACHE / f"{name}.json", CACHE / f"{name}.log"
    with _locked(CACHE / ".lock"):
        if final.is_dir() and record_file.exists():
            copy_files(d, final)
            os.utime(final)
            return Build(final, json.loads(record_file.read_text()), built=False)
        free_gb = shutil.disk_usage(CACHE).free / 2**30
        if free_gb < NEED_FREE_GB:
            raise RuntimeError(f"container build: {free_gb:.1f} GB free under {CACHE}, needs {NEED_FREE_GB} GB")
        t0 = time.monotonic()
        base, base_s = base_root(image, log)
        tmp = CACHE / f".{name}.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log_file.write_text(f"build of {def_path} key {key} args {build_args or {}}\n")
        try:
            subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tmp)], check=True)
            copy_files(d, tmp)
            write_metadata(d, text, tmp)
            log(f"container build: %post of {def_path} running (log {log_file})")
            post_s = run_post(d, tmp, binds, log_file)
            labels = write_labels(d, tmp)
            for leftover in (tmp / "tmp").iterdir():
                shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
            test_s, test_out = run_test(tmp, log_file)
        except BaseException:
            if not os.environ.get("HPCTRAIN_CONTAINER_KEEP_FAILED"):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        record = {"definition": str(def_path), "key": key, "build_args": build_args or {},
                  "binds": [f"{s}:{t}:{m}" for s, t, m in binds], "tools_install_s": round(tools_s, 1),
                  "base_debootstrap_s": round(base_s, 1), "post_s": round(post_s, 1), "test_s": round(test_s, 1),
                  "total_s": round(time.monotonic() - t0, 1),
                  "horovod_built_from_source": "building Horovod" in log_file.read_text(errors="replace"),
                  "root_bytes": size_bytes(tmp), "labels": labels, "test_output_tail": test_out[-1500:],
                  "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        os.rename(tmp, final)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
        _prune(def_path.stem, final)
        return Build(final, record, built=True)


def _bind(spec: str) -> tuple[str, str, str]:
    src, _, rest = spec.partition(":")
    dst, _, mode = rest.partition(":")
    if not src or mode not in ("", "ro", "rw"):
        raise argparse.ArgumentTypeError(f"--bind {spec!r} is not SRC[:DST[:ro|rw]]")
    return src, dst or src, mode or "rw"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.containers.rootfs", description=__doc__.splitlines()[0])
    p.add_argument("definition")
    p.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--bind", action="append", default=[], type=_bind, metavar="SRC[:DST[:ro]]")
    args = p.parse_args(argv)
    try:
        build_args = dict(a.split("=", 1) for a in args.build_arg if "=" in a)
        if len(build_args) != len(args.build_arg):
            raise DefinitionError(f"--build-arg: {args.build_arg} must be NAME=VALUE")
        b = build(args.definition, build_args, args.bind, log=lambda m: print(m, file=sys.stderr))
    except (DefinitionError, OSError) as e:
        print(f"rootfs: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"root": str(b.root), "built_now": b.built, **{k: v for k, v in b.record.items()
                                                                     if k != "test_output_tail"}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
