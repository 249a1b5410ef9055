"""The launchers on PATH (mpirun, srun) and how Open MPI's mpirun treats Ctrl-C. These start subprocesses,
so they order before mpi4py (70): fork() after MPI_Init is unsafe on some transports."""
from __future__ import annotations

import os
import re
import shutil

from hpctrain.doctor.common import Context, mpi_flavour, probe
from hpctrain.doctor.registry import Outcome, check

SIGKILL_PARAM = "odls_base_sigkill_timeout"
SIGKILL_MIN_S = 10  # time for the ranks to agree on a step, save a checkpoint and exit
SIGKILL_FIX = (f"export OMPI_MCA_{SIGKILL_PARAM}=20 (or `{SIGKILL_PARAM} = 20` in ~/.openmpi/mca-params.conf) "
               "before mpirun/horovodrun")


@check("mpirun", order=50)
def mpirun(ctx: Context) -> Outcome:
    path = shutil.which("mpirun")
    if path is None:
        return ("PASS", "not on PATH (srun launches here)", None) if ctx.cluster.job_id else \
            ("WARN", "not on PATH", "load the site's MPI module (module load openmpi), or use horovodrun --gloo")
    rc, out = probe(path, "--version")
    ctx.facts["mpirun"] = out
    detail = f"{path}: {out.splitlines()[0] if out else '(no output)'}"
    return ("PASS", detail, None) if rc == 0 else ("WARN", detail, "this mpirun fails: check the MPI install")


@check("srun", order=60)
def srun(ctx: Context) -> Outcome:
    path = shutil.which("srun")
    if path is None:
        return "SKIP", "srun not on PATH (no Slurm here)", None
    rc, out = probe(path, "--mpi=list")
    if rc != 0:
        return "WARN", f"{path} --mpi=list failed: {out.splitlines()[-1] if out else rc}", \
            "on a Slurm login/compute node check SLURM_CONF and slurmctld; elsewhere ignore"
    plugins = ctx.facts["srun_plugins"] = re.findall(r"^\s*(?:srun: )?(\w+)\s*$", out, re.M)
    detail = f"{path}, MPI plugins: {', '.join(plugins) or out}"
    if not {"pmix", "pmi2"} & set(plugins):
        return "WARN", detail, "no PMIx/PMI-2 plugin: start the ranks with mpirun inside the allocation"
    return "PASS", detail, None


def open_mpi_launch(ctx: Context) -> str | None:
    """`when` of ctrl-c: launched by Open MPI's mpirun/horovodrun, or alone where the mpirun on PATH (the
    one the launch line proposes) is Open MPI's."""
    if ctx.cluster.launcher == "openmpi":
        return None
    srun_here = ctx.cluster.job_id and shutil.which("srun")  # the launch line proposes srun
    if ctx.cluster.launcher == "single" and not srun_here and mpi_flavour(ctx.facts.get("mpirun", "")).startswith(
            "Open MPI"):
        return None
    return f"not an Open MPI launch ({ctx.cluster.launcher} launcher): the ranks get Ctrl-C's SIGINT themselves"


def sigkill_timeout() -> tuple[str, str]:
    """(value, where it comes from) of Open MPI's odls_base_sigkill_timeout, as mpirun would see it here:
    ompi_info resolves the environment, mca-params.conf files and the default; without ompi_info the
    environment variable alone."""
    if shutil.which("ompi_info"):
        rc, out = probe("ompi_info", "--parsable", "--level", "9", "--param", "odls", "base")
        found = dict(re.findall(rf"^mca:odls:base:param:{SIGKILL_PARAM}:(value|source):(.*)$", out, re.M))
        if rc == 0 and "value" in found:
            return found["value"].strip(), found.get("source", "?").strip()
    value = os.environ.get(f"OMPI_MCA_{SIGKILL_PARAM}")  # an MCA setting, not a launcher identity
    return (value, "environment") if value is not None else ("1", "default")


@check("ctrl-c", order=65, when=open_mpi_launch)
def ctrl_c(ctx: Context) -> Outcome:
    """mpirun answers Ctrl-C with SIGCONT to every rank, then SIGTERM and SIGKILL each sigkill_timeout later."""
    value, source = sigkill_timeout()
    try:
        seconds = float(value)
    except ValueError:
        return "WARN", f"{SIGKILL_PARAM} is {value!r} ({source}), not a number of seconds", SIGKILL_FIX
    found = f"{SIGKILL_PARAM} {seconds:g} s ({source}): on Ctrl-C mpirun sends SIGCONT, SIGTERM {seconds:g} s " \
            f"later, SIGKILL {seconds:g} s after that"
    if seconds < SIGKILL_MIN_S:
        return "WARN", f"{found}: too short for the ranks to save a checkpoint", SIGKILL_FIX
    return "PASS", f"{found}: time for the ranks to agree on a step and save", None
