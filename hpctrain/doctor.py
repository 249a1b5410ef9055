"""Preflight: will this installation run on this cluster? `python -m hpctrain.doctor`, alone or under
mpirun / horovodrun / srun. One line per check, `PASS|WARN|FAIL|SKIP  <check>: <found>[ -> <fix>]`, then
`launch: <command>`; exit 1 if any FAIL, 2 for a bad flag.

Every rank runs the checks and sends them to rank 0 (mpi4py gather, or Horovod's under horovodrun --gloo),
which prints its own line per check plus any rank that found something else, by rank and host. The
run-directory write test runs on rank 0 only: the one rank that writes checkpoints and metrics. A watchdog
turns a stuck rank (a missing peer, a blocked network) into a FAIL line instead of a hang.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from hpctrain.cluster import ClusterEnv, detect, threads_per_rank, visible_gpu_index
from hpctrain.errors import UserError

SEVERITY = {"PASS": 0, "SKIP": 0, "WARN": 1, "FAIL": 2}
REPEATS = 5
RUN_DIR_TEST_BYTES = 64 << 20
INSTALL_FIX = "reinstall with scripts/install.sh, with the site's MPI module loaded"
MISMATCH_FIX = ("mpi4py/Horovod are built against a different MPI than the one that launched this job: rebuild "
                "with the launcher's MPI module loaded, or launch with that MPI's mpirun / srun --mpi=pmix")


@dataclass
class Check:
    status: str
    name: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.status}  {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix else "")


def say(text: str) -> None:
    sys.stdout.write(text + "\n")  # one write per line: mpirun --tag-output never tags a bare newline
    sys.stdout.flush()


def probe(*cmd: str) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:  # e.g. srun looking for an unreachable slurmctld: a WARN, not a FAIL
        return 124, f"{' '.join(cmd)}: no answer within 20 s"
    return p.returncode, (p.stdout + p.stderr).strip()


def mpi_flavour(text: str) -> str:
    """'Open MPI v4.1.4, package...' or 'mpirun (Open MPI) 4.1.4' -> 'Open MPI 4.1.4'."""
    vendors = (("open mpi", "Open MPI"), ("intel", "Intel MPI"), ("cray", "Cray MPICH"), ("mvapich", "MVAPICH"),
               ("mpich", "MPICH"), ("hydra", "MPICH"))
    vendor = next((name for key, name in vendors if key in text.lower()), "unknown MPI")
    version = re.search(r"\d+\.\d+(?:\.\d+)?", text)
    return f"{vendor} {version.group(0) if version else '?'}"


class Doctor:
    def __init__(self, args, cluster: ClusterEnv, notes: list[Check]):
        self.args, self.cluster, self.checks = args, cluster, notes
        self.facts: dict = {}  # what later checks and the launch line need
        self.comm = self.hvd = None
        self.spans: set[str] = set()  # the libraries whose world is this launch's world
        self.stage = "start"

    def run(self, name: str, fn, error_fix: str = INSTALL_FIX) -> None:
        """One check; an exception becomes its FAIL line, never a traceback."""
        self.stage = name
        try:
            status, detail, fix = fn()
        except Exception as e:
            status, detail, fix = "FAIL", f"{type(e).__name__}: {e}".strip(), error_fix
        self.checks.append(Check(status, name, detail, fix))

    # ---- 1. versions. Probes run before MPI starts: fork() after MPI_Init is unsafe on some transports.
    def python(self):
        return "PASS", f"{platform.python_version()} ({sys.executable})", None

    def torch(self):
        import torch
        hip = getattr(torch.version, "hip", None)
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {hip}" if hip else "CPU build"
        self.facts["gpu_build"] = build != "CPU build"
        return "PASS", f"{torch.__version__} ({build})", None

    def tensorflow(self):
        if importlib.util.find_spec("tensorflow") is None:
            return "PASS", "not installed (optional)", None
        import tensorflow as tf
        return "PASS", tf.__version__, None

    def horovod(self):
        import horovod
        import horovod.torch as hvd
        from horovod.common.util import get_extension_full_path
        # What `horovodrun --check-build` lists, without its fork per question: which extensions exist.
        libs = {"PyTorch": ("torch", "mpi_lib_v2"), "TensorFlow": ("tensorflow", "mpi_lib"),
                "MXNet": ("mxnet", "mpi_lib")}
        frameworks = [n for n, lib in libs.items() if os.path.exists(get_extension_full_path(horovod.__file__, *lib))]
        built = {"MPI": hvd.mpi_built(), "Gloo": hvd.gloo_built(), "NCCL": hvd.nccl_built()}
        self.facts.update(hvd_mpi=bool(built["MPI"]), hvd_gloo=bool(built["Gloo"]))
        flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in built.items())
        detail = f"{horovod.__version__}; frameworks: {', '.join(frameworks) or 'none'}; built with {flags}"
        if not (built["MPI"] or built["Gloo"]):
            return "FAIL", detail, "Horovod has no controller: " + INSTALL_FIX
        if self.facts.get("gpu_build") and not built["NCCL"]:
            return "WARN", detail, "GPU torch but no NCCL: rebuild Horovod with HOROVOD_GPU_OPERATIONS=NCCL"
        return "PASS", detail, None

    def mpirun(self):
        path = shutil.which("mpirun")
        if path is None:
            return ("PASS", "not on PATH (srun launches here)", None) if self.cluster.job_id else \
                ("WARN", "not on PATH", "load the site's MPI module (module load openmpi), or use horovodrun --gloo")
        rc, out = probe(path, "--version")
        self.facts["mpirun"] = out
        detail = f"{path}: {out.splitlines()[0] if out else '(no output)'}"
        return ("PASS", detail, None) if rc == 0 else ("WARN", detail, "this mpirun fails: check the MPI install")

    def srun(self):
        path = shutil.which("srun")
        if path is None:
            return "SKIP", "srun not on PATH (no Slurm here)", None
        rc, out = probe(path, "--mpi=list")
        if rc != 0:
            return "WARN", f"{path} --mpi=list failed: {out.splitlines()[-1] if out else rc}", \
                "on a Slurm login/compute node check SLURM_CONF and slurmctld; elsewhere ignore"
        plugins = self.facts["srun_plugins"] = re.findall(r"^\s*(?:srun: )?(\w+)\s*$", out, re.M)
        detail = f"{path}, MPI plugins: {', '.join(plugins) or out}"
        if not {"pmix", "pmi2"} & set(plugins):
            return "WARN", detail, "no PMIx/PMI-2 plugin: start the ranks with mpirun inside the allocation"
        return "PASS", detail, None

    # ---- MPI and Horovod start-up
    def mpi4py(self):
        import mpi4py
        from mpi4py import MPI  # initialises MPI: a singleton of size 1 when no MPI launcher started us
        self.comm = MPI.COMM_WORLD
        library = self.facts["mpi_lib"] = MPI.Get_library_version().replace("\x00", "").strip()  # C string NUL
        return "PASS", f"{mpi4py.__version__}, links {library.splitlines()[0].strip()}", None

    def start_horovod(self) -> None:
        c = self.cluster
        mpi_spans = self.comm is not None and self.comm.Get_size() == c.size > 1
        # The controller that can run here: Gloo under horovodrun --gloo, MPI under an MPI launcher or alone.
        can = c.launcher != "torchrun" and self.facts.get("hvd_gloo" if c.launcher == "horovod-gloo" else "hvd_mpi")
        if mpi_spans:  # every rank inits, or none: no hang
            can = self.mpi_allreduce([bool(can)], "MIN")[0]
        if can:
            import horovod.torch as hvd
            hvd.init()
            self.hvd = hvd
        hvd_spans = self.hvd is not None and self.hvd.size() == c.size > 1
        self.spans = {lib for lib, ok in (("mpi4py", mpi_spans), ("horovod", hvd_spans)) if ok}

    # ---- 2. consistency
    def ranks(self):
        c = self.cluster
        self.start_horovod()  # a failed hvd.init() is this check's FAIL
        seen = {"launcher": (c.rank, c.size)}
        if self.comm is not None and not (c.launcher in ("horovod-gloo", "torchrun") and self.comm.Get_size() == 1):
            seen["mpi4py"] = (self.comm.Get_rank(), self.comm.Get_size())  # (not an MPI launch: singletons)
        if self.hvd is not None:
            seen["Horovod"] = (self.hvd.rank(), self.hvd.size())
        if len(set(seen.values())) > 1:
            found = ", ".join(f"{k} rank {r} of {s}" for k, (r, s) in seen.items())
            return "FAIL", f"{c.launcher} launcher disagrees: {found}", MISMATCH_FIX
        others = " and ".join(k for k in seen if k != "launcher")
        detail = f"{c.launcher} launcher, {c.size} rank(s) on {c.num_nodes} node(s); {others or 'nothing'} agree"
        if self.hvd is None:  # not importable (see horovod), or no controller for this launcher
            return "WARN", detail + "; Horovod not started", "launch with mpirun/srun or horovodrun --gloo, or use " \
                "--backend ddp"
        return "PASS", detail, None

    def mpi_match(self):
        if "mpi_lib" not in self.facts or "mpirun" not in self.facts:
            return "SKIP", "no mpirun or no mpi4py to compare", None
        linked, launcher = mpi_flavour(self.facts["mpi_lib"]), mpi_flavour(self.facts["mpirun"])
        if linked != launcher:
            return "WARN", f"mpi4py links {linked}, but mpirun on PATH is {launcher}", \
                "put the mpirun of the MPI that mpi4py/Horovod were built with first on PATH, or rebuild them"
        return "PASS", f"mpi4py links {linked}, mpirun is {launcher}", None

    # ---- 3. GPUs and threads (rank-neutral text: ranks that see the same thing print nothing extra)
    def gpus(self):
        import torch
        c, n, threads = self.cluster, torch.cuda.device_count(), threads_per_rank(self.cluster)
        self.facts["gpus"] = n
        if n == 0:
            detail = f"no GPU: training runs on CPU, {threads} thread(s) per rank, {c.local_size} rank(s) on this node"
            return ("WARN", detail, "a GPU build of torch sees no GPU: request GPUs (--gres=gpu:N) or check "
                    "CUDA_VISIBLE_DEVICES") if self.facts.get("gpu_build") else ("PASS", detail, None)
        name = torch.cuda.get_device_name(visible_gpu_index(c, n))  # raises if more ranks than GPUs
        detail = f"{n} GPU(s) visible ({name}), {c.local_size} rank(s) on this node bind cuda:<local rank>, " \
                 f"{threads} thread(s) per rank"
        if n > c.local_size:
            return "WARN", detail, f"{n - c.local_size} GPU(s) idle: launch one rank per GPU (--ntasks-per-node={n})"
        return "PASS", detail, None

    # ---- 4. collectives: verified on every rank, timed by the slowest rank
    def collective(self, lib: str, kind: str):
        import numpy as np
        c, nbytes = self.cluster, self.args.bytes
        if lib not in self.spans:
            reason = "not an MPI launch" if c.launcher in ("horovod-gloo", "torchrun") else "see ranks"
            return "SKIP", f"{lib} does not connect the {c.size} launched ranks ({reason})", None
        base = (np.arange(max(1, nbytes // 4)) % 251).astype(np.float32)  # index-dependent: a shift shows
        if kind == "allreduce":
            send, want = base + (c.rank + 1), base * c.size + c.size * (c.size + 1) / 2
        else:
            send, want = (base + 0.5 if c.rank == 0 else np.zeros_like(base)), base + 0.5
        op, barrier, slowest = (self.horovod_ops if lib == "horovod" else self.mpi_ops)(kind, send)
        result = np.asarray(op())  # the warm-up (negotiation, buffers) gives the result to verify
        times = []
        for _ in range(REPEATS):
            barrier()
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(slowest(times))
        wrong = np.flatnonzero(result != want)
        if wrong.size:
            i = int(wrong[0])
            return "FAIL", f"wrong result on rank {c.rank}: {wrong.size} of {want.size} values differ, first [{i}] " \
                           f"{result[i]} != {want[i]}", "the MPI transport corrupts data: report it to the admins"
        factor = 2 * (c.size - 1) / c.size if kind == "allreduce" else 1.0  # bus bandwidth, as nccl-tests
        return "PASS", f"result correct; busbw {nbytes * factor / seconds / 1e9:.2f} GB/s at " \
                       f"{nbytes / 2**20:g} MiB (median of {REPEATS}, slowest rank)", None

    def horovod_ops(self, kind, send):
        import torch
        hvd, x = self.hvd, torch.from_numpy(send)
        op = (lambda: hvd.allreduce(x, op=hvd.Sum, name="doctor.allreduce")) if kind == "allreduce" else \
            (lambda: hvd.broadcast(x, root_rank=0, name="doctor.broadcast"))
        return op, hvd.barrier, lambda t: hvd.allreduce(torch.tensor(t), op=hvd.Max, name=f"doctor.{kind}.s").tolist()

    def mpi_ops(self, kind, send):
        import numpy as np
        from mpi4py import MPI
        comm, out = self.comm, np.empty_like(send)
        # Allreduce/Bcast return None: `or` hands back the buffer they filled
        op = (lambda: comm.Allreduce(send, out, op=MPI.SUM) or out) if kind == "allreduce" else \
            (lambda: comm.Bcast(send, root=0) or send)
        return op, comm.Barrier, lambda t: self.mpi_allreduce(t, "MAX")

    def mpi_allreduce(self, values: list, op: str) -> list:
        # Buffer calls release the GIL while they wait (mpi4py's pickled-object ones do not): the watchdog
        # can then still report a peer that never arrives.
        import numpy as np
        from mpi4py import MPI
        buffer = np.array(values, dtype=np.float64)
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=getattr(MPI, op))
        return buffer.tolist()

    # ---- 5. run directory
    def run_dir(self):
        path = Path(self.args.run_dir).absolute()
        created = [p for p in [path, *path.parents] if not p.exists()]  # removed again afterwards
        tmp, final = path / f".doctor-{os.getpid()}.tmp", path / f".doctor-{os.getpid()}.bin"
        step = "creating the directory"
        try:
            path.mkdir(parents=True, exist_ok=True)
            data, t0, step = os.urandom(RUN_DIR_TEST_BYTES), time.perf_counter(), "writing"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                step = "fsync"
                os.fsync(f.fileno())
            step = "renaming"
            os.replace(tmp, final)
            seconds, step = time.perf_counter() - t0, "reading back"
            if final.read_bytes() != data:
                return "FAIL", f"{path}: read back differs from what was written", "use another file system"
            return "PASS", f"{path}: {RUN_DIR_TEST_BYTES >> 20} MiB written, fsynced, renamed, read back identical " \
                           f"({RUN_DIR_TEST_BYTES / seconds / 1e6:.0f} MB/s write)", None
        except OSError as e:
            return "FAIL", f"{path}: {e} (while {step})", \
                "pick a --run-dir this user can write, on a file system with room for checkpoints (ls -ld, df -h)"
        finally:  # leave nothing behind, not even the directories made for the test
            for leftover in (tmp, final):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            for directory in created:
                with contextlib.suppress(OSError):
                    directory.rmdir()

    # ---- 6. the launch command for this machine
    def launch(self, hosts: list[str]) -> str:
        c, f = self.cluster, self.facts
        found = shutil.which("python")
        python = "python" if found and os.path.realpath(found) == os.path.realpath(sys.executable) else sys.executable
        train = f"{python} -m hpctrain.resnet"
        gpus = f.get("gpus", 0)
        open_mpi = mpi_flavour(f.get("mpi_lib", "")).startswith("Open MPI")
        if (c.launcher == "slurm" or c.job_id) and shutil.which("srun"):
            plugins = f.get("srun_plugins") or ["pmix"]  # Debian's Open MPI has PMIx only, no PMI-2
            plugin = "pmix" if "pmix" in plugins and (open_mpi or "pmi2" not in plugins) else "pmi2"
            return f"srun --mpi={plugin}{f' --ntasks-per-node={gpus}' if gpus else ''} {train}"
        n = c.size if c.size > 1 else gpus or min(2, os.cpu_count() or 1)
        per_host = {h: hosts.count(h) for h in dict.fromkeys(hosts)}
        host_flag = " -H " + ",".join(f"{h}:{k}" for h, k in per_host.items()) if len(per_host) > 1 else ""
        if c.launcher == "horovod-gloo":
            return f"horovodrun --gloo -np {n}{host_flag or f' -H localhost:{n}'} {train}"
        if c.launcher == "torchrun":
            return f"torchrun --nproc-per-node {c.local_size} -m hpctrain.resnet --backend ddp"
        if n == 1 or "mpi_lib" not in f or not f.get("hvd_mpi"):
            return train + ("" if f.get("hvd_mpi") or f.get("hvd_gloo") else " --backend none")
        if c.launcher == "single" and shutil.which("horovodrun"):
            return f"horovodrun -np {n}{host_flag} {train}"
        root = " --allow-run-as-root" if open_mpi and os.geteuid() == 0 else ""
        return f"mpirun -np {n}{host_flag}{root} {train}"

    # ---- the whole run
    def main(self) -> int:
        for name in ("python", "torch", "tensorflow", "horovod", "mpirun", "srun", "mpi4py"):
            self.run(name, getattr(self, name))
        self.run("ranks", self.ranks, MISMATCH_FIX)
        self.run("mpi library", self.mpi_match)
        self.run("gpus", self.gpus, "launch one rank per GPU (srun --ntasks-per-node=<GPUs>), or --device cpu")
        if self.cluster.size < 2:
            self.checks.append(Check("SKIP", "collectives", "1 rank: run the doctor under the launcher to test "
                                     "allreduce/broadcast (mpirun -np 2 ..., srun --mpi=pmix -N 2 ...)"))
        for lib in ("horovod", "mpi4py") if self.cluster.size > 1 else ():
            for kind in ("allreduce", "broadcast"):
                self.run(f"{lib} {kind}", lambda: self.collective(lib, kind), "check the network between the nodes")
        self.stage = "gathering the results"
        where = getattr(self.cluster, "node_name", "") or self.cluster.hostname  # Slurm's node name if any
        mine = (self.cluster.rank, where, [asdict(ch) for ch in self.checks])
        if "mpi4py" in self.spans:
            self.comm.Barrier()  # a late peer is waited for here, where the watchdog can still fire
            everyone = self.comm.gather(mine, root=0)
        elif "horovod" in self.spans:
            everyone = self.hvd.allgather_object(mine)  # Horovod has no gather: everyone gets it, rank 0 keeps it
            everyone = everyone if self.hvd.rank() == 0 else None
        else:  # nothing connects the ranks: each can only judge itself, and rank 0 prints
            everyone = [mine] if self.cluster.rank == 0 else None
        verdict = None
        if everyone is not None:
            self.run("run dir", self.run_dir)
            everyone[0] = (*mine[:2], [asdict(ch) for ch in self.checks])
            checks = merge(everyone)
            self.report(checks, self.launch([host for _, host, _ in everyone]))
            verdict = int(any(ch.status == "FAIL" for ch in checks))
        self.stage = "sharing the verdict"  # every rank exits with rank 0's code
        if "mpi4py" in self.spans:
            verdict = int(self.mpi_allreduce([verdict or 0], "MAX")[0])  # rank 0's; the others have none
        elif "horovod" in self.spans:
            verdict = self.hvd.broadcast_object(verdict, root_rank=0, name="doctor.verdict")
        if self.hvd is not None:
            self.hvd.shutdown()
        return verdict if verdict is not None else int(any(ch.status == "FAIL" for ch in self.checks))

    def report(self, checks: list[Check], launch: str) -> None:
        if self.args.json:
            return say(json.dumps({"checks": [asdict(ch) for ch in checks], "launch": launch,
                                   "launcher": self.cluster.launcher, "ranks": self.cluster.size}))
        for ch in checks:
            say(ch.line())
        say(f"launch: {launch}")


def merge(everyone: list) -> list[Check]:
    """Rank 0's line per check, plus every rank that found something else (at least a WARN)."""
    root = {d["name"]: Check(**d) for d in everyone[0][2]}
    differs: dict[str, dict] = {}
    for rank, host, checks in everyone[1:]:
        for d in checks:
            ref = root.get(d["name"])
            found = (d["status"], d["detail"], d["fix"])
            if ref is None or found != (ref.status, ref.detail, ref.fix):
                differs.setdefault(d["name"], {}).setdefault(found, []).append((rank, host))
    merged = []
    for name in [*root, *(n for n in differs if n not in root)]:
        ch = root.get(name) or Check("PASS", name, "(no result on rank 0)")
        for (status, detail, fix), who in differs.get(name, {}).items():
            ranks = ",".join(str(r) for r, _ in who[:8]) + (f" +{len(who) - 8} more" if len(who) > 8 else "")
            hosts = ",".join(dict.fromkeys(h for _, h in who))
            ch.detail += f"; rank{'s' if len(who) > 1 else ''} {ranks} ({hosts}): {status} {detail}"
            ch.status = max(ch.status, status, "WARN", key=SEVERITY.get)
            ch.fix = ch.fix or fix or "ranks should see the same: one shared installation, alike nodes and settings"
        merged.append(ch)
    return merged


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message)


def parse_args(argv):
    p = _OneLineParser(prog="hpctrain.doctor", description="Preflight checks of this installation on this "
                       "cluster; run alone or under mpirun/horovodrun/srun (rank 0 prints).")
    p.add_argument("--run-dir", default="runs/default", help="directory to write-test (default: runs/default)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.add_argument("--bytes", type=int, default=16 << 20, help="allreduce/broadcast size (default: 16 MiB)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds before a stuck rank becomes a FAIL line instead of a hang (default: 120)")
    args = p.parse_args(argv)
    for flag in ("bytes", "timeout"):
        if not getattr(args, flag) > 0:  # also rejects nan
            p.error(f"argument --{flag}: must be > 0, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> int:
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cluster = detect()
        except UserError as e:  # contradicting launcher variables: this process judges itself alone
            cluster = ClusterEnv(rank=0, local_rank=0, size=1, local_size=1, node_rank=0, launcher="single")
            notes.append(Check("FAIL", "launcher", str(e), "launch with one launcher (mpirun, horovodrun or srun)"))
    notes += [Check("WARN", "launcher", str(w.message), "start the ranks with srun inside the job") for w in caught]
    try:
        args = parse_args(argv)
    except UserError as e:
        if cluster.rank == 0:
            print(f"hpctrain.doctor: error: {e}", file=sys.stderr, flush=True)
        return 2
    doctor = Doctor(args, cluster, notes)

    def give_up():
        if cluster.rank == 0:
            doctor.report([*doctor.checks, Check("FAIL", "doctor", f"no answer within {args.timeout:g} s while in "
                                                 f"'{doctor.stage}'", "a rank is missing or stuck: check that every "
                                                 "rank started and that the nodes reach each other")], "(undetermined)")
        os._exit(1)  # not a normal exit: MPI_Finalize would wait for the stuck rank
    # The timer prints the FAIL line when rank 0 waits in a call that releases the GIL (MPI buffer calls,
    # Horovod, I/O); faulthandler's own C thread is the backstop for one that does not (stacks on stderr,
    # exit 1). The other ranks wait longer, so rank 0 reports before any of them gives up.
    limit = args.timeout + (0 if cluster.rank == 0 else 30)
    watchdog = threading.Timer(limit, give_up)
    watchdog.daemon = True
    watchdog.start()
    faulthandler.dump_traceback_later(limit + 30, exit=True)
    code = doctor.main()
    watchdog.cancel()
    faulthandler.cancel_dump_traceback_later()
    return code


if __name__ == "__main__":
    sys.exit(main())
