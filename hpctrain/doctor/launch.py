"""The `launch:` line: the command that starts the chosen entry point (--entry) under the launcher detected
here, with the ranks, hosts and MPI plugin the checks found."""
from __future__ import annotations

import os
import shutil
import sys

from hpctrain.doctor.common import Context, mpi_flavour


def python() -> str:
    """`python` where that is this interpreter, else its full path."""
    found = shutil.which("python")
    return "python" if found and os.path.realpath(found) == os.path.realpath(sys.executable) else sys.executable


def entry_module(ctx: Context) -> str:
    """`-m hpctrain.<entry>`, with --framework tf where TensorFlow is there and PyTorch is not."""
    framework = " --framework tf" if ctx.facts.get("tensorflow") and not ctx.facts.get("torch") else ""
    return f"-m hpctrain.{ctx.args.entry}{framework}"


def srun_line(ctx: Context, train: str, open_mpi: bool) -> str:
    plugins = ctx.facts.get("srun_plugins") or ["pmix"]  # Debian's Open MPI has PMIx only, no PMI-2
    plugin = "pmix" if "pmix" in plugins and (open_mpi or "pmi2" not in plugins) else "pmi2"
    gpus = ctx.facts.get("gpus", 0)
    return f"srun --mpi={plugin}{f' --ntasks-per-node={gpus}' if gpus else ''} {train}"


def command(ctx: Context, hosts: list[str]) -> str:
    """The launch command; `hosts`: each rank's host, gathered by rank 0."""
    c, f = ctx.cluster, ctx.facts
    train = f"{python()} {entry_module(ctx)}"
    open_mpi = mpi_flavour(f.get("mpi_lib", "")).startswith("Open MPI")
    if (c.launcher == "slurm" or c.job_id) and shutil.which("srun"):
        return srun_line(ctx, train, open_mpi)
    if c.launcher == "tf-config":  # one process per TF_CONFIG task, each with its own TF_CONFIG
        return f"{python()} -m hpctrain.{ctx.args.entry} --framework tf --backend multiworker"
    if c.launcher == "torchrun":
        return f"torchrun --nproc-per-node {c.local_size} -m hpctrain.{ctx.args.entry} --backend ddp"
    n = c.size if c.size > 1 else f.get("gpus", 0) or min(2, os.cpu_count() or 1)
    per_host = {h: hosts.count(h) for h in dict.fromkeys(hosts)}
    host_flag = " -H " + ",".join(f"{h}:{k}" for h, k in per_host.items()) if len(per_host) > 1 else ""
    if c.launcher == "horovod-gloo":
        return f"horovodrun --gloo -np {n}{host_flag or f' -H localhost:{n}'} {train}"
    if n == 1 or "mpi_lib" not in f or not f.get("hvd_mpi"):
        return train + ("" if f.get("hvd_mpi") or f.get("hvd_gloo") else " --backend none")
    if c.launcher == "single" and shutil.which("horovodrun"):
        return f"horovodrun -np {n}{host_flag} {train}"
    root = " --allow-run-as-root" if open_mpi and os.geteuid() == 0 else ""
    return f"mpirun -np {n}{host_flag}{root} {train}"
