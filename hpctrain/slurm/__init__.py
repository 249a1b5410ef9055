"""Render (and optionally submit) a Slurm batch script from the templates in slurm/.

    python -m hpctrain.slurm --nodes 4 --gpus-per-node 4 --site example_gpu --time 12:00:00 > job.sh
    python -m hpctrain.slurm --nodes 2 --site mysite --submit -- --config configs/resnet50.toml

Only the `#SBATCH` header of the template is rewritten (nodes, tasks and GPUs per node, time, job
name, output, account/partition from the site file, the site itself via --export), so the template
stays the single source of the job's body. Every value is checked against a strict pattern before it
is written into a shell script; a bad one gives one line `hpctrain.slurm: error: ...` and exit 2.

`python -m hpctrain.slurm supervise ...` is the other half, run inside the job: the supervisor of the
training step (hpctrain.slurm.supervise), which the templates call through slurm/env.sh.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hpctrain.errors import UserError

PROG = "hpctrain.slurm"
ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "slurm"
TEMPLATES = {"resnet": "resnet_8node.sh", "bert": "bert_multinode.sh", "pipeline": "pipeline_hybrid.sh"}
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_HEADER = re.compile(r"^#SBATCH\s+--([a-z-]+)(?:=(.*))?$")


class SlurmHelperError(UserError, ValueError):
    """A value that must not go into a batch script (one line, names the value and what is allowed)."""


def positive_int(text: str, what: str, minimum: int = 1) -> int:
    if not re.fullmatch(r"[0-9]+", str(text)) or int(text) < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SlurmHelperError(f"{what}: {text!r} is not {kind}")
    return int(text)


def name(text: str, what: str) -> str:
    if not NAME.fullmatch(str(text)):
        raise SlurmHelperError(f"{what}: {text!r} is not allowed (allowed: letters, digits, '_', '.', '-')")
    return text


def slurm_time(text: str, what: str = "--time") -> str:
    """Slurm's time formats; minutes and seconds after the first field below 60, hours after days below 24."""
    m = re.fullmatch(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?", str(text))
    bad = SlurmHelperError(f"{what}: {text!r} is not a Slurm time limit (allowed: {TIME_FORMATS}, above zero)")
    if not m:
        raise bad
    days, *parts = m.groups()
    fields = [int(v) for v in parts if v is not None]
    if any(v >= 60 for v in fields[1:]) or (days is not None and fields[0] >= 24):
        raise bad
    if int(days or 0) == 0 and all(v == 0 for v in fields):
        raise bad
    return text


def site_file(site: str) -> Path:
    path = SLURM_DIR / "sites" / f"{site}.sh"
    if not path.is_file():
        known = sorted(p.stem for p in (SLURM_DIR / "sites").glob("*.sh"))
        raise SlurmHelperError(f"--site: {site!r} has no file slurm/sites/{site}.sh (allowed: {', '.join(known)})")
    return path


def read_site(site: str) -> dict[str, str]:
    """Account, partition and GPUs per node as the job would see them (the environment overrides the file)."""
    path = site_file(site)
    script = ('HPCTRAIN_ROOT=$1; source "$2" >/dev/null || exit 3; '
              'printf "%s\\0" "${HPCTRAIN_ACCOUNT:-}" "${HPCTRAIN_PARTITION:-}" "${HPCTRAIN_GPUS_PER_NODE:-0}"')
    p = subprocess.run(["bash", "-c", script, "_", str(ROOT), str(path)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    lines = p.stdout.split("\0")  # NUL-separated: a newline inside a value must not shift the others
    if p.returncode != 0 or len(lines) < 3:
        raise SlurmHelperError(f"--site {site}: sourcing {path} failed: {p.stderr.strip() or p.returncode}")
    account, partition, gpus = lines[:3]
    values = {"account": account, "partition": partition}
    for key, value in values.items():
        if value:
            name(value, f"--site {site}: HPCTRAIN_{key.upper()}")
    values["gpus_per_node"] = str(positive_int(gpus, f"--site {site}: HPCTRAIN_GPUS_PER_NODE", minimum=0))
    return values


def render(model: str = "resnet", nodes: int | None = None, gpus_per_node: int | None = None,
           site: str = "default", time: str | None = None, job_name: str | None = None) -> str:
    """The template with its #SBATCH header rewritten. Every value is validated here, before it
    reaches the script text (the CLI passes its strings straight through)."""
    if model not in TEMPLATES:
        raise SlurmHelperError(f"--model: {model!r} is not allowed (allowed: {', '.join(TEMPLATES)})")
    name(site, "--site")
    site_values = read_site(site)
    gpus = positive_int(gpus_per_node if gpus_per_node is not None else site_values["gpus_per_node"],
                        "--gpus-per-node", minimum=0)
    text = (SLURM_DIR / TEMPLATES[model]).read_text()
    lines = text.splitlines()
    header = [i for i, line in enumerate(lines) if _HEADER.match(line)]
    values = {k: v for k, v in (_HEADER.match(lines[i]).groups() for i in header)}
    job = name(job_name, "--job-name") if job_name is not None else values["job-name"]
    set_ = {"job-name": job, "output": f"{job}-%j.out"}
    if nodes is not None:
        set_["nodes"] = str(positive_int(nodes, "--nodes"))
    if time is not None:
        set_["time"] = slurm_time(time)
    add = {}
    if gpus > 0:
        # One rank per GPU, and an explicit job-level GPU request (not every site hands out the GPUs
        # of an --exclusive node without one).
        set_["ntasks-per-node"] = str(gpus)
        add["gpus-per-node"] = str(gpus)
    for key in ("account", "partition"):
        if site_values[key]:
            add[key] = site_values[key]
    add["export"] = f"ALL,HPCTRAIN_SITE={site},HPCTRAIN_GPUS_PER_NODE={gpus}"
    missing = [k for k in set_ if k not in values]
    if missing:
        raise RuntimeError(f"template slurm/{TEMPLATES[model]} lacks #SBATCH --{', --'.join(missing)}")
    for i in header:
        key = _HEADER.match(lines[i]).group(1)
        if key in set_:
            lines[i] = f"#SBATCH --{key}={set_[key]}"
        elif key in add:
            lines[i] = f"#SBATCH --{key}={add.pop(key)}"
    extra = [f"#SBATCH --{k}={v}" for k, v in add.items()]
    extra.append(f"# rendered by `python -m {PROG}` from slurm/{TEMPLATES[model]} for site {site}")
    lines[header[-1] + 1:header[-1] + 1] = extra
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> _Parser:
    p = _Parser(prog=PROG, description="Render a Slurm batch script from slurm/<model> template "
                                       "(print it, or submit it with --submit).")
    p.add_argument("--model", default="resnet", choices=list(TEMPLATES), help="which training template")
    p.add_argument("--nodes", help="nodes (default: the template's)")
    p.add_argument("--gpus-per-node", help="GPUs (= ranks) per node; 0 = CPU mode (default: the site file's)")
    p.add_argument("--site", default="default",
                   help="slurm/sites/<site>.sh: account, partition, modules, GPUs, container, python")
    p.add_argument("--time", help=f"time limit ({TIME_FORMATS})")
    p.add_argument("--job-name", help="job name (also names the output file)")
    p.add_argument("--submit", action="store_true", help="submit with sbatch instead of printing the script")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: arguments for the training module (only with --submit)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        if train_args and not args.submit:
            raise SlurmHelperError(f"training arguments {shlex.join(train_args)!r} are passed on only with "
                                   "--submit (or append them to your own `sbatch job.sh ...` line)")
        script = render(args.model, args.nodes, args.gpus_per_node, args.site, args.time, args.job_name)
        if not args.submit:
            sys.stdout.write(script)
            return 0
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            raise SlurmHelperError("--submit: sbatch not found on PATH (run this on a Slurm login node)")
    except SlurmHelperError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    # sbatch copies the script at submission, so a temporary file is enough; the job finds the
    # repository through HPCTRAIN_ROOT (exported with the rest of the environment).
    env = dict(os.environ)
    env.setdefault("HPCTRAIN_ROOT", str(ROOT))
    with tempfile.NamedTemporaryFile("w", prefix="hpctrain-", suffix=".sh") as f:
        f.write(script)
        f.flush()
        return subprocess.run([sbatch, f.name, *train_args], env=env).returncode

