#!/usr/bin/env python3
"""hpctrain on one GPU machine without internet access, as one prepared command.

Runs the steps below in order, each timed and limited, within a time budget (7 minutes by default), and
writes ONE JSON, $OUT/gpu_check.json (machine info, every figure, each step's command, status, seconds and
log tail), beside $OUT/gpu_check_logs.tar.gz (every step's log and each run's metrics.jsonl; no checkpoints).
A failed step is recorded (status, rc, log tail, error lines) and the steps that do not depend on it still run.

  python3 benchmarks/gpu_check.py             # the real thing, on the GPU machine (about 7 minutes at most)
  python3 benchmarks/gpu_check.py --dry-run   # print each step's command, write the JSON skeleton and check
                                              # what can be checked here (wheelhouse, Python, torch); no GPU

The GPU machine needs a Python with a CUDA build of torch (and its NCCL), cmake and a C++ compiler; no
internet, no Horovod, no MPI. What hpctrain lacks there comes from an offline wheelhouse that
scripts/gpu_check_prepare.sh fills beforehand on a machine with internet (.gpu-check-wheels/ in the
repository: copy it along with the repository). This driver uses the standard library only.

Steps:
  01 machine_info          nvidia-smi, python/torch/CUDA/NCCL/cuDNN versions, mpirun, nvcc, cmake, cores, /dev/shm
  02 install_deps          what hpctrain imports and the machine lacks, offline from the wheelhouse
  03 horovod_build         Horovod (lock version) from the wheelhouse's sdist: NCCL GPU ops, PyTorch, Gloo (+MPI)
  04 horovod_check_build   horovodrun --check-build
  05/06 resnet50_fp16/bf16 hpctrain ResNet-50 synthetic 224 px, batch 256, 60 steps, horovodrun -np 1
                           (--backend none when Horovod did not build)
  07/08 plain_resnet50_*   benchmarks/plain_horovod.py at the same settings (the like-for-like peer)
  09 bert_base_bf16        hpctrain BERT-base MLM, bf16, built-in corpus, 40 steps
  10 ddp_resnet50_fp16     --backend ddp (NCCL) under torchrun --nproc_per_node 1, 30 steps
  11/12 resume_fp16_*      20 steps with checkpoints every 10, then the same run dir to 30: resumed at
                           step 20? GradScaler loss scale read from the checkpoints

Environment (all optional; relative paths are taken from the repository root):
  OUT                        output folder (default gpu-check-out); run dirs go to $OUT/runs during the run
  GPU_CHECK_WHEELS           the wheelhouse (default .gpu-check-wheels; scripts/gpu_check_prepare.sh fills it)
  GPU_CHECK_PYTHON           the Python that holds the machine's torch (default: the one running this script)
  GPU_CHECK_WORK             scratch for the Horovod build and the installed packages
                             (default $TMPDIR/hpctrain-gpu-check)
  GPU_CHECK_BUDGET_S         whole-run budget in seconds (default 420); a step never runs past it, a step that
                             cannot get GPU_CHECK_MIN_STEP_S (default 20) is recorded as skipped
  GPU_CHECK_BUILD_TIMEOUT_S  the Horovod build's own limit (default 240)
  GPU_CHECK_KEEP=1           keep $OUT/runs, $OUT/logs and the state folder (default: packed, then removed, so
                             that $OUT holds just the JSON and the log archive to copy back)

`gpu_check.py probe NAME ARGS...` is internal: the steps' commands call it under GPU_CHECK_PYTHON.
"""
# Why `pip install --target` + PYTHONPATH and not a venv: the machine's python3 may itself be a venv (as in
# many container images); a venv made from it with --system-site-packages sees the BASE interpreter's
# site-packages, not that venv's, so its CUDA torch would vanish; `pip install --user` is refused inside a
# venv. A --target folder first on PYTHONPATH adds only what is missing, works with any interpreter layout,
# and leaves the machine's torch alone.
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ME = "gpu_check.py"
SCRIPT = "benchmarks/gpu_check.py"  # as the steps' commands call the probes (they run in the repository root)
PREPARE = "run scripts/gpu_check_prepare.sh"
RESERVE_S = 15  # seconds kept for writing the JSON and packing the logs
ANCHOR = {"images_per_s": 2470, "what": "NVIDIA DeepLearningExamples ResNet-50 v1.5 (PyTorch), AMP training, "
          "one A100, batch 256, as published by NVIDIA (not re-checked here)",
          "note": "not like for like: DALI input pipeline, channels-last, another GPU; hpctrain here reads "
                  "synthetic images through its own loader, NCHW"}
# What hpctrain's PyTorch path imports at run time (torch beside). critical: a run cannot start without it.
RUNTIME = [("torch", True), ("numpy", True), ("PIL", True), ("tqdm", True), ("transformers", True),
           ("tokenizers", True), ("tensorboard.summary", False), ("yaml", False), ("psutil", False),
           ("cloudpickle", False), ("packaging", False), ("cffi", False)]
RESNET = ("--dataset synthetic --arch resnet50 --image-size 224 --batch-size 256 --lr 0.01 --warmup-epochs 0 "
          "--epochs 1")


class UsageError(Exception):
    """Bad input: one line naming the bad value and what is allowed; exit status 2."""


# ---------------------------------------------------------------------------------------------------------
# The steps, as data. `what` and `command` are templates, filled from `context()` when the step's turn
# comes: the launcher, for one, depends on whether Horovod built.

@dataclass(frozen=True)
class Step:
    id: str
    name: str
    what: str
    timeout_s: int | None  # None: GPU_CHECK_BUILD_TIMEOUT_S
    command: str
    needs: tuple[str, ...] = ()  # "gpu", "sdist", "horovod", or an earlier step's name that must end "ok"
    figures: str | None = None  # "hpctrain" (metrics.jsonl), "plain" (the JSON line in the log), "resume"
    run_dir: str | None = None  # under $OUT/runs; {run_dir} in the command
    without_horovod: str | None = None  # a note recorded when the step runs without Horovod


RESUME = ("{launch} -m hpctrain.resnet {backend} --dataset synthetic --arch resnet18 --image-size 224 "
          "--batch-size 128 --lr 0.01 --warmup-epochs 0 --epochs 1 --synthetic-size 3840 --amp fp16 "
          "--checkpoint-every 10 --log-every 10 --progress never --eval-every-epoch false --workers {workers}"
          "{tb_flag} --run-dir {run_dir} --resume auto")
NO_HOROVOD = "Horovod not available: --backend none (one process)"

STEPS = [
    Step("01", "machine_info", "nvidia-smi, python/torch/CUDA/NCCL versions, MPI, compilers, cores, /dev/shm", 60,
         "{probe} machine {machine_json}"),
    Step("02", "install_deps", "import-check hpctrain's runtime packages; pip install --no-deps --no-index from "
         "the wheelhouse only the missing ones, into {site} (PYTHONPATH)", 120,
         "{probe} missing {wheels} {missing_txt} {install_json} && if [ -s {missing_txt} ]; then {pip} install -q "
         "--disable-pip-version-check --no-index --find-links {wheels} --no-deps --no-compile --target {site} "
         "-r {missing_txt}; fi && {probe} importable {importable_json}"),
    Step("03", "horovod_build", "Horovod {hvd_version} from the wheelhouse's sdist: NCCL GPU ops, PyTorch, "
         "Gloo{mpi_what}, CUDA arch {gpu_cc}", None,
         "env {build_env} {pip} wheel -v --disable-pip-version-check --no-index --no-deps --no-build-isolation "
         "--no-cache-dir -w {wheel_dir} {sdist} && {pip} install -q --disable-pip-version-check --no-index "
         "--no-deps --no-compile --target {site} {wheel_dir}/horovod-{hvd_version}-*.whl", needs=("sdist",)),
    Step("04", "horovod_check_build", "horovodrun --check-build", 60, "{hvdrun} --check-build",
         needs=("sdist", "horovod_build")),
    Step("05", "resnet50_fp16", "hpctrain ResNet-50, synthetic 224 px, batch 256, --amp fp16, 60 steps, "
         "{backend_name}", 90, "{launch} -m hpctrain.resnet {backend} {resnet} --amp fp16 --synthetic-size 15360 "
         "--max-steps 60 --log-every 20 {common} --run-dir {run_dir}",
         needs=("gpu",), figures="hpctrain", run_dir="resnet50_fp16", without_horovod=NO_HOROVOD),
    Step("06", "resnet50_bf16", "hpctrain ResNet-50, synthetic 224 px, batch 256, --amp bf16, 60 steps, "
         "{backend_name}", 90, "{launch} -m hpctrain.resnet {backend} {resnet} --amp bf16 --synthetic-size 15360 "
         "--max-steps 60 --log-every 20 {common} --run-dir {run_dir}",
         needs=("gpu",), figures="hpctrain", run_dir="resnet50_bf16", without_horovod=NO_HOROVOD),
    Step("07", "plain_resnet50_fp16", "benchmarks/plain_horovod.py at the same settings (--amp fp16, 60 steps, "
         "2 warm-up)", 75, "{hvdrun} -np 1 -H localhost:1 --gloo {py} benchmarks/plain_horovod.py --device cuda "
         "--amp fp16 --arch resnet50 --image-size 224 --batch-size 256 --steps 60",
         needs=("horovod", "gpu"), figures="plain"),
    Step("08", "plain_resnet50_bf16", "benchmarks/plain_horovod.py at the same settings (--amp bf16, 60 steps, "
         "2 warm-up)", 75, "{hvdrun} -np 1 -H localhost:1 --gloo {py} benchmarks/plain_horovod.py --device cuda "
         "--amp bf16 --arch resnet50 --image-size 224 --batch-size 256 --steps 60",
         needs=("horovod", "gpu"), figures="plain"),
    Step("09", "bert_base_bf16", "hpctrain BERT-base MLM, --amp bf16, built-in corpus (prepared on the machine), "
         "batch 64, 40 steps, {backend_name}", 120, "{launch} -m hpctrain.bert {backend} --preset base --amp bf16 "
         "--batch-size 64 --max-steps 40 --epochs 100 --log-every 10 --corpus-cache {corpus_cache} --progress never "
         "--resume never --eval-every-epoch false{tb_flag} --run-dir {run_dir}",
         needs=("gpu",), figures="hpctrain", run_dir="bert_base_bf16"),
    Step("10", "ddp_resnet50_fp16", "hpctrain ResNet-50 --backend ddp (NCCL) under torchrun --nproc_per_node 1, "
         "fp16, 30 steps", 75, "{py} -m torch.distributed.run --standalone --nproc_per_node 1 -m hpctrain.resnet "
         "--backend ddp {resnet} --amp fp16 --synthetic-size 7680 --max-steps 30 --log-every 10 {common} "
         "--run-dir {run_dir}", needs=("gpu",), figures="hpctrain", run_dir="ddp_resnet50_fp16"),
    # ResNet-18: the scaler path is the same; a smaller checkpoint and start-up keep the budget for the figures.
    Step("11", "resume_fp16_part1", "ResNet-18 fp16, --checkpoint-every 10 --max-steps 20 (checkpoints at 10 "
         "and 20)", 75, RESUME + " --max-steps 20", needs=("gpu",), figures="hpctrain", run_dir="resume_fp16"),
    Step("12", "resume_fp16_part2", "the same run dir to 30 steps: must say 'resumed from ... at step 20'; loss "
         "scale from each checkpoint's 'scaler'", 75, RESUME + " --max-steps 30",
         needs=("gpu", "resume_fp16_part1"), figures="resume", run_dir="resume_fp16"),
]


# ---------------------------------------------------------------------------------------------------------
# Settings (from the environment) and what the run learns about the machine as it goes.

@dataclass(frozen=True)
class Config:
    dry: bool
    out: Path
    wheels: Path
    python: str
    work: Path
    budget_s: int
    min_step_s: int
    build_timeout_s: int
    keep: bool
    hvd_version: str

    @property
    def state(self) -> Path:
        return self.out / ".gpu-check-state"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def site(self) -> Path:
        return self.work / "site"

    @property
    def json(self) -> Path:
        return self.out / "gpu_check.json"

    @property
    def sdist(self) -> Path:
        return self.wheels / f"horovod-{self.hvd_version}.tar.gz"


@dataclass
class Facts:
    have_gpu: bool
    hvd_ok: bool
    workers: int
    nproc: int
    mpi: bool
    gpu_cc: str = "90"
    tb_ok: bool = True
    buildenv: dict = field(default_factory=dict)  # HOROVOD_NCCL_* and HOROVOD_CUDA_HOME from the buildenv probe


def env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"\d+", raw) or int(raw) < minimum:
        raise UsageError(f"{name}={raw!r} (allowed: a whole number of seconds >= {minimum})")
    return int(raw)


def horovod_version() -> str:
    lock = ROOT / "requirements" / "lock.txt"
    found = re.search(r"^horovod==([^ \\\n]+)", lock.read_text(), re.M) if lock.is_file() else None
    if not found:
        raise UsageError(f"{lock}: no 'horovod==' line (allowed: the repository's lock file, unchanged)")
    return found[1]


def load_config(dry: bool) -> Config:
    """From the environment; relative paths from the repository root (the caller is there)."""
    keep = os.environ.get("GPU_CHECK_KEEP", "0").strip() or "0"
    if keep not in ("0", "1"):
        raise UsageError(f"GPU_CHECK_KEEP={keep!r} (allowed: 0 or 1)")
    budget_s, min_step_s = env_int("GPU_CHECK_BUDGET_S", 420, 1), env_int("GPU_CHECK_MIN_STEP_S", 20, 1)
    build_timeout_s, hvd_version = env_int("GPU_CHECK_BUILD_TIMEOUT_S", 240, 1), horovod_version()
    out = Path(os.environ.get("OUT") or "gpu-check-out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"OUT={str(out)!r}: cannot create it ({e.strerror}; allowed: a writable folder)") from e
    work = os.environ.get("GPU_CHECK_WORK") or os.path.join(os.environ.get("TMPDIR") or "/tmp", "hpctrain-gpu-check")
    wheels = os.path.abspath(os.environ.get("GPU_CHECK_WHEELS") or ".gpu-check-wheels")
    return Config(dry=dry, out=out.resolve(), wheels=Path(wheels), work=Path(work).resolve(),
                  python=os.environ.get("GPU_CHECK_PYTHON") or sys.executable, budget_s=budget_s,
                  min_step_s=min_step_s, build_timeout_s=build_timeout_s, keep=keep == "1", hvd_version=hvd_version)


def refuse(cfg: Config, message: str) -> None:
    """A check that cannot start: say so in the one JSON (for its readers) and as one line; exit 2."""
    write_json(cfg.json, {"dry_run": cfg.dry, "error": message, "steps": []})
    raise UsageError(f"{message}; wrote {cfg.json}")


def first_facts(cfg: Config) -> Facts:
    """Before machine_info: a dry run plans as if everything were there (GPU, Horovod, /dev/shm)."""
    mpi = bool(shutil.which("mpirun") and shutil.which("mpicxx"))
    return Facts(have_gpu=cfg.dry, hvd_ok=cfg.dry, workers=8 if cfg.dry else 0, nproc=cpus_usable(), mpi=mpi)


def cpus_usable() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 4


def workers_for(shm_free_mib: int) -> int:
    """Data-loader workers: each holds up to 2 batches of 256 x 3 x 224 x 224 float32 (154 MB) in /dev/shm."""
    return 8 if shm_free_mib >= 4096 else 4 if shm_free_mib >= 1536 else 0


def build_env(cfg: Config, facts: Facts) -> str:
    """Horovod's build settings. C++17 shim: Horovod 0.28.1 compiles its PyTorch extension with -std=c++14,
    PyTorch >= 2.1 needs C++17 (horovod#3996, scripts/install.sh). HOROVOD_BUILD_CUDA_CC_LIST: only this GPU's
    architecture (the default, every architecture nvcc knows, multiplies the CUDA kernels' build time).
    CMAKE_POLICY_VERSION_MINIMUM: CMake >= 4 refuses the bundled gloo's cmake_minimum_required(2.8.12)."""
    q, found = shlex.quote, facts.buildenv
    cxx = shutil.which("c++") or shutil.which("g++") or "c++"
    parts = [f"CXX={q(str(ROOT / 'scripts' / 'cxx17-shim.sh'))}", f"HPCTRAIN_REAL_CXX={q(cxx)}",
             "HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITHOUT_TENSORFLOW=1",
             "HOROVOD_WITHOUT_MXNET=1", "HOROVOD_WITH_GLOO=1", "HOROVOD_WITH_MPI=1" if facts.mpi
             else "HOROVOD_WITHOUT_MPI=1", f"HOROVOD_BUILD_CUDA_CC_LIST={facts.gpu_cc}",
             f"HOROVOD_NCCL_LINK={found.get('HOROVOD_NCCL_LINK', 'SHARED')}"]
    if found.get("HOROVOD_NCCL_INCLUDE"):
        parts += [f"HOROVOD_NCCL_INCLUDE={q(found['HOROVOD_NCCL_INCLUDE'])}",
                  f"HOROVOD_NCCL_LIB={q(found['HOROVOD_NCCL_LIB'])}"]
    if found.get("HOROVOD_CUDA_HOME"):
        parts += [f"HOROVOD_CUDA_HOME={q(found['HOROVOD_CUDA_HOME'])}", f"CUDA_HOME={q(found['HOROVOD_CUDA_HOME'])}"]
    return " ".join([*parts, "CMAKE_POLICY_VERSION_MINIMUM=3.5", f"MAKEFLAGS=-j{facts.nproc}"])


def context(cfg: Config, facts: Facts, step: Step | None = None) -> dict[str, str]:
    """Every value the step templates use, shell-quoted where it is a path or a program."""
    q = shlex.quote
    py = q(cfg.python)
    hvdrun = f"{py} -m horovod.runner.launch"  # = horovodrun, without relying on the script's shebang
    launch, backend = (f"{hvdrun} -np 1 -H localhost:1 --gloo {py}", "--backend horovod") if facts.hvd_ok \
        else (py, "--backend none")
    tb_flag = "" if facts.tb_ok else " --tensorboard false"
    state = cfg.state
    return {"py": py, "pip": f"{py} -m pip", "hvdrun": hvdrun, "probe": f"{py} {SCRIPT} probe",
            "wheels": q(str(cfg.wheels)), "site": q(str(cfg.site)), "sdist": q(str(cfg.sdist)),
            "wheel_dir": q(str(cfg.work / "wheel")), "hvd_version": cfg.hvd_version,
            "machine_json": q(str(state / "machine.json")), "missing_txt": q(str(state / "missing.txt")),
            "install_json": q(str(state / "install.json")), "importable_json": q(str(state / "importable.json")),
            "gpu_cc": facts.gpu_cc, "mpi_what": " + MPI" if facts.mpi else ", no MPI",
            "build_env": build_env(cfg, facts), "launch": launch, "backend": backend, "backend_name": backend[2:],
            "workers": str(facts.workers), "tb_flag": tb_flag, "resnet": RESNET,
            "common": f"--progress never --resume never --eval-every-epoch false --workers {facts.workers}{tb_flag}",
            "corpus_cache": q(str(cfg.runs / "corpus-builtin")),
            "run_dir": q(str(cfg.runs / step.run_dir)) if step and step.run_dir else ""}


def prepare_environment(cfg: Config) -> None:
    """What every step sees (recorded in the JSON's settings)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(cfg.site), str(ROOT), *([old] if old else [])])
    os.environ["PATH"] = os.pathsep.join([str(cfg.site / "bin"), os.environ.get("PATH", "")])
    os.environ["PIP_CONFIG_FILE"] = os.devnull  # the machine's pip config (indexes, constraints) stays out of it
    os.environ.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    # mpirun refuses to run as root without these; GPU machines (containers) often run everything as root.
    os.environ.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def clear_outputs(cfg: Config) -> None:
    """What an earlier check left in $OUT."""
    for path in (cfg.state, cfg.logs, cfg.runs):
        shutil.rmtree(path, ignore_errors=True)
    for path in (cfg.json, cfg.out / "gpu_check_logs.tar.gz"):
        path.unlink(missing_ok=True)


def make_folders(cfg: Config) -> None:
    if not cfg.dry:
        for path in (cfg.site, cfg.work / "wheel", cfg.work / "nccl-lib"):
            shutil.rmtree(path, ignore_errors=True)
        for path in (cfg.logs, cfg.runs, cfg.site, cfg.work / "wheel"):
            path.mkdir(parents=True, exist_ok=True)
    for path in (cfg.state, cfg.work):
        path.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Running the steps.

@dataclass
class Result:
    step: Step
    what: str
    command: str
    timeout_s: int
    status: str = "not run"
    notes: list[str] = field(default_factory=list)
    rc: int | None = None
    seconds: float | None = None
    log: Path | None = None
    figures: dict = field(default_factory=dict)


def run_command(command: str, limit: int, log: Path) -> int:
    """`command` under /bin/sh in the repository root, output to `log`; 124 when it ran past `limit` seconds.
    It leads its own process group, so that a timeout ends the launchers' workers too."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, shell=True, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            end_group(proc)
            return 124
        except BaseException:
            end_group(proc)
            raise


def end_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_probe(cfg: Config, name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess | None:
    """A probe under GPU_CHECK_PYTHON (the interpreter that holds the machine's torch)."""
    try:
        return subprocess.run([cfg.python, SCRIPT, "probe", name, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


class GpuCheck:
    def __init__(self, cfg: Config):
        self.cfg, self.started = cfg, time.time()
        self.facts = first_facts(cfg)
        self.results: list[Result] = []
        self.pending_notes: dict[str, list[str]] = {}

    def note(self, name: str, text: str) -> None:
        self.pending_notes.setdefault(name, []).append(text)

    def left_s(self) -> int:
        return int(self.cfg.budget_s - (time.time() - self.started))

    def run_all(self) -> None:
        if self.cfg.dry and not self.cfg.wheels.is_dir():
            self.note("install_deps", f"wheelhouse missing: {PREPARE}")
        for step in STEPS:
            if step.name == "horovod_build":
                self.learn_buildenv()
            result = self.run_step(step)
            self.results.append(result)
            if self.cfg.dry:
                continue
            learn = {"machine_info": self.learn_machine, "install_deps": self.learn_imports,  # what later steps
                     "horovod_check_build": self.learn_horovod}.get(step.name)  # take from this one's outcome
            if learn:
                learn(result)
            if step.figures:
                run_dir = self.cfg.runs / step.run_dir if step.run_dir else None
                result.figures = figures(self.cfg, step.figures, run_dir, result.log)

    def run_step(self, step: Step) -> Result:
        ctx = context(self.cfg, self.facts, step)
        limit = self.cfg.build_timeout_s if step.timeout_s is None else step.timeout_s
        res = Result(step, step.what.format_map(ctx), step.command.format_map(ctx), limit,
                     notes=self.pending_notes.pop(step.name, []))
        print(f"== {step.id} {step.name} (limit {limit}s)\n   {res.command}", flush=True)
        if self.cfg.dry:
            res.status = "planned"
            return res
        if step.without_horovod and not self.facts.hvd_ok:
            res.notes.append(step.without_horovod)
        reason = self.unmet(step)
        if reason:
            res.status, res.timeout_s = "skipped", 0
            res.notes.append(reason)
        elif self.left_s() - RESERVE_S < self.cfg.min_step_s:
            res.status = "skipped"
            res.notes.append(f"time budget: {self.left_s()}s of {self.cfg.budget_s}s left")
            reason = "time budget"
        if reason:
            print(f"   skipped: {reason}", flush=True)
            return res
        room = self.left_s() - RESERVE_S
        if limit > room:
            res.timeout_s = room
            res.notes.append(f"limit cut to {room}s by the budget")
        self.execute(res)
        return res

    def execute(self, res: Result) -> None:
        res.log = self.cfg.logs / f"{res.step.id}-{res.step.name}.log"
        t0 = time.monotonic()
        res.rc = run_command(res.command, res.timeout_s, res.log)
        res.seconds = round(time.monotonic() - t0, 1)
        res.status = "ok" if res.rc == 0 else "timeout" if res.rc in (124, 137) else "failed"
        print(f"   {res.status} (rc {res.rc}, {res.seconds} s)", flush=True)

    def unmet(self, step: Step) -> str | None:
        status = {r.step.name: r.status for r in self.results}
        for need in step.needs:
            if need == "gpu" and not self.facts.have_gpu:
                return "no CUDA device visible to torch (see machine_info)"
            if need == "sdist" and not self.cfg.sdist.is_file():
                return f"no sdist at {self.cfg.sdist}: {PREPARE}"
            if need == "horovod" and not self.facts.hvd_ok:
                return "Horovod not available"
            if need in status and status[need] != "ok":
                return f"{need} did not succeed ({status[need]})"
        return None

    def learn_machine(self, res: Result) -> None:
        m = load(self.cfg.state / "machine.json", {})
        torch = m.get("torch") or {}
        self.facts.have_gpu = bool(torch.get("cuda_available"))
        self.facts.gpu_cc = str(torch.get("capability", "9.0")).replace(".", "")
        self.facts.nproc = m.get("cpus_usable") or self.facts.nproc
        self.facts.workers = workers_for(m.get("shm_free_mib") or 0)

    def learn_imports(self, res: Result) -> None:
        found = load(self.cfg.state / "importable.json")
        if found:
            self.facts.tb_ok = found.get("imports", {}).get("tensorboard.summary") == "ok"

    def learn_buildenv(self) -> None:
        """Where the NCCL headers/library and nvcc are, seen from GPU_CHECK_PYTHON (a dry run plans with it too)."""
        run_probe(self.cfg, "buildenv", str(self.cfg.work), str(self.cfg.state / "buildenv.json"), timeout=60)
        found = load(self.cfg.state / "buildenv.json", {})
        self.facts.buildenv = found.get("env") or {}
        runtime = found.get("nccl_runtime_dir")
        if runtime:
            old = os.environ.get("LD_LIBRARY_PATH")
            os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([runtime, *([old] if old else [])])
        if not self.cfg.dry and not self.facts.buildenv.get("HOROVOD_NCCL_INCLUDE"):
            self.note("horovod_build", "no NCCL headers/library found (torch's nvidia-nccl wheel, /usr): "
                                       "the build will likely fail")

    def learn_horovod(self, res: Result) -> None:
        text = res.log.read_text(errors="replace") if res.log and res.log.is_file() else ""
        self.facts.hvd_ok = res.status == "ok" and "[X] PyTorch" in text

    def backend_used(self) -> dict[str, str]:
        return {"hpctrain_backend": "horovod" if self.facts.hvd_ok else "none",
                "launcher": "horovodrun -np 1 --gloo" if self.facts.hvd_ok else "python (one process)",
                "dataloader_workers": str(self.facts.workers),
                "tensorboard": "on" if self.facts.tb_ok else "off (not importable)"}

    def settings(self) -> dict[str, str]:
        cfg = self.cfg
        return {"out": str(cfg.out), "wheelhouse": str(cfg.wheels), "python": cfg.python, "work": str(cfg.work),
                "budget_s": str(cfg.budget_s), "build_timeout_s": str(cfg.build_timeout_s),
                "horovod_with_mpi": str(int(self.facts.mpi)), "horovod_version": cfg.hvd_version,
                **{k: os.environ.get(k, "") for k in ("PYTHONPATH", "PIP_CONFIG_FILE", "LD_LIBRARY_PATH")}}


# ---------------------------------------------------------------------------------------------------------
# Figures from each run: its metrics.jsonl, the plain loop's JSON line, the resume line and loss scales.

def figures(cfg: Config, kind: str, run_dir: Path | None, log: Path | None) -> dict:
    fig = metrics_figures(run_dir) if kind in ("hpctrain", "resume") and run_dir else {}
    text = log.read_text(errors="replace") if log and log.is_file() else ""
    if kind == "plain":
        # horovodrun prefixes each line of a rank ("[0]<stdout>:"): take the JSON object wherever it starts.
        found = re.findall(r'(\{[^\n]*"samples_per_s_total"[^\n]*\})', text)
        if found:
            rec = json.loads(found[-1])
            fig["samples_per_s"] = round(rec["samples_per_s_total"], 1)
            fig.update({k: rec[k] for k in ("device", "amp") if k in rec})
    if kind == "resume":
        m = re.search(r"resumed from (\S+) at step (\d+)", text)
        fig["resumed_from"] = m[1] if m else None
        fig["resumed_at_step"] = int(m[2]) if m else None
        fig["resumed_at_step_20"] = bool(m and m[2] == "20")
        fig["loss_scale_by_checkpoint"] = loss_scales(cfg, run_dir)
    return fig


def metrics_figures(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
    train = [r for r in rows if r.get("kind") == "train"]
    fig: dict = {"intervals": [{"step": r["step"], "samples_per_s": round(r["samples_per_s_total"], 1),
                                "loss": round(r["loss"], 4)} for r in train]}
    if train:
        # The first interval holds the start-up (cuDNN choices, allocator growth, loader warm-up).
        steady = train[1:] or train
        fig["samples_per_s"] = round(steady[-1]["samples_per_s_total"], 1)
        fig["samples_per_s_mean_after_first_interval"] = round(
            sum(r["samples_per_s_total"] for r in steady) / len(steady), 1)
        fig["last_step"], fig["final_loss"] = train[-1]["step"], round(train[-1]["loss"], 4)
    return fig


def loss_scales(cfg: Config, run_dir: Path | None) -> dict:
    if not run_dir or not (run_dir / "checkpoints").is_dir():
        return {}
    done = run_probe(cfg, "loss-scales", str(run_dir), timeout=60)
    try:
        return json.loads(done.stdout)
    except (AttributeError, ValueError):
        return {"error": "probe loss-scales: " + (done.stderr.strip()[-300:] if done else "did not run")}


# ---------------------------------------------------------------------------------------------------------
# What a dry run checks here: the wheelhouse (manifest, wheel tags), the Python and its torch, the tools.

def wheel_ok(filename: str, minor: int) -> bool:
    parts = filename[:-4].split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    pys = py.split(".")
    if not (plat == "any" or ("x86_64" in plat and ("manylinux" in plat or "linux" in plat))):
        return False
    if abi == "none":
        return any(p in ("py3", f"cp3{minor}", f"py3{minor}") for p in pys)
    if abi == "abi3":
        return any(p.startswith("cp3") and int(p[3:]) <= minor for p in pys)
    return f"cp3{minor}" in abi.split(".")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheelhouse_checks(wheels: Path, sdist: Path) -> list[dict]:
    if not wheels.is_dir():
        return [check("wheelhouse", False, f"wheelhouse missing: {PREPARE}")]
    files = sorted(p.name for p in wheels.iterdir())
    size = sum(p.stat().st_size for p in wheels.iterdir() if p.is_file())
    have_sdist = sdist.is_file()
    res = [check("wheelhouse", True, f"{wheels}: {len(files)} files, {size / 2**20:.1f} MiB"),
           check("horovod sdist", have_sdist, sdist.name + (" present" if have_sdist else f" missing: {PREPARE}"))]
    rows = read_manifest(wheels)
    if rows is None:
        return [*res, check("manifest", False, f"manifest.tsv missing: {PREPARE}")]
    whls = [f for f in files if f.endswith(".whl")]
    for minor in (11, 12, 13):
        lacking = [f"{d}=={v}" for d, v, _ in rows
                   if not any(norm(f.split("-")[0]) == norm(d) and f.split("-")[1] == v and wheel_ok(f, minor)
                              for f in whls)]
        res.append(check(f"wheels for CPython 3.{minor}", not lacking,
                         f"all {len(rows)} step-2 packages" if not lacking else f"lacking: {', '.join(lacking)}"))
    return res


def interpreter_checks(cfg: Config) -> list[dict]:
    done = run_probe(cfg, "interpreter")
    try:
        info = json.loads(done.stdout)
    except (AttributeError, ValueError):
        why = done.stderr.strip().splitlines()[-1:] if done else ["did not answer"]
        return [check("python", False, f"{cfg.python}: {why[0] if why else 'no output'}"),
                check("torch import", False, "not tried")]
    return [check("python", info["version_ok"], f"{info['executable']} {info['version']} (hpctrain needs >= 3.11)"),
            check("torch import", "torch_error" not in info, info.get("torch_error") or info.get("torch"))]


def tool_checks() -> list[dict]:
    res = []
    for tool in ("nvidia-smi", "nvcc", "mpirun", "cmake", "c++", "sh"):
        path = shutil.which(tool)
        required = tool == "sh"  # the steps' commands run under /bin/sh
        res.append({"check": f"{tool} present", "ok": bool(path), "required": required,
                    "detail": (path or "not here") + ("" if required else " (reported, not required here)")})
    return res


def check(name: str, ok: object, detail: str) -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


# ---------------------------------------------------------------------------------------------------------
# The one JSON and the console summary.

def tail(path: Path, n: int = 25, width: int = 300) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:width] for line in lines[-n:]]


def error_lines(path: Path, n: int = 15) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    pat = re.compile(r"(\berror\b|Error:|FAILED|fatal|Traceback|No such file|not found)", re.I)
    out: list[str] = []
    for i, line in enumerate(lines):
        if pat.search(line):
            # CMake and compilers put the reason on the lines after the first one
            out += [x[:300] for x in lines[i:i + (4 if "CMake Error" in line or "error:" in line else 1)]]
        if len(out) >= n:
            break
    return out[:n]


def step_record(res: Result, dry: bool, out_dir: Path) -> dict:
    s = {"id": res.step.id, "name": res.step.name, "what": res.what, "command": res.command, "status": res.status,
         "timeout_s": res.timeout_s}
    if res.notes:
        s["note"] = "\n".join(res.notes)
    if not dry:
        s["rc"], s["seconds"] = res.rc, res.seconds
        if res.log:
            s["log"] = os.path.relpath(res.log, out_dir)
            s["log_tail"] = tail(res.log)
            if res.status != "ok":
                s["error_lines"] = error_lines(res.log)
        s["figures"] = res.figures
    return s


def summary_of(steps: list[dict], backend_used: dict) -> dict:
    by = {s["name"]: s for s in steps}

    def fig(name: str, key: str):
        return (by.get(name, {}).get("figures") or {}).get(key)

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    rn = {}
    for amp in ("fp16", "bf16"):
        h, p = fig(f"resnet50_{amp}", "samples_per_s"), fig(f"plain_resnet50_{amp}", "samples_per_s")
        rn[amp] = {"hpctrain_images_per_s": h, "plain_horovod_images_per_s": p, "hpctrain_vs_plain": ratio(h, p),
                   "hpctrain_vs_anchor": ratio(h, ANCHOR["images_per_s"]),
                   "plain_vs_anchor": ratio(p, ANCHOR["images_per_s"])}
    d = fig("ddp_resnet50_fp16", "samples_per_s")
    rn["ddp_fp16"] = {"images_per_s": d, "ddp_vs_hpctrain_horovod_fp16": ratio(d, rn["fp16"]["hpctrain_images_per_s"])}
    return {"resnet50_224_batch256": rn,
            "bert_base_bf16_sequences_per_s": fig("bert_base_bf16", "samples_per_s"),
            "resume_fp16": {k: fig("resume_fp16_part2", k)
                            for k in ("resumed_at_step", "resumed_at_step_20", "loss_scale_by_checkpoint")},
            "horovod_built": by.get("horovod_build", {}).get("status") == "ok",
            "backend_used": backend_used, "step_status": {s["name"]: s["status"] for s in steps}}


def document(check_run: GpuCheck) -> dict:
    cfg = check_run.cfg
    steps = [step_record(r, cfg.dry, cfg.out) for r in check_run.results]
    doc = {"schema": "hpctrain-gpu-check/1", "dry_run": cfg.dry, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "budget_s": cfg.budget_s, "total_s": round(time.time() - check_run.started, 1),
           "machine": load(cfg.state / "machine.json", {}), "settings": check_run.settings(), "anchor": ANCHOR,
           "summary": {} if cfg.dry else summary_of(steps, check_run.backend_used()), "steps": steps}
    if cfg.dry:
        doc["checks"] = wheelhouse_checks(cfg.wheels, cfg.sdist) + interpreter_checks(cfg) + tool_checks()
        doc["plan_complete"] = all(s["command"] for s in steps)
    for extra in ("install", "importable", "buildenv"):
        if (cfg.state / f"{extra}.json").is_file():
            doc.setdefault("details", {})[extra] = load(cfg.state / f"{extra}.json")
    return doc


def print_summary(doc: dict) -> None:
    """A short summary for the console (the end of the output is what a terminal or job log shows)."""
    for s in doc["steps"]:
        head = (s.get("figures") or {}).get("samples_per_s")
        took = "" if doc["dry_run"] else f"{s.get('seconds') or 0:>6}s"
        note = "; ".join(s["note"].splitlines()) if s.get("note") else ""
        print(f"  {s['id']} {s['name']:<22} {s['status']:<8} {took}" + (f"  {head} samples/s" if head else "")
              + (f"  ({note})" if note else ""))
    for c in doc.get("checks", []):
        print(f"  check: {c['check']}: {'ok' if c['ok'] else 'NO'}: {c['detail']}")
    if doc["summary"]:
        print(json.dumps(doc["summary"], indent=1, default=str))


def pack_logs(cfg: Config) -> Path:
    """Every log and each run's metrics.jsonl (not checkpoints, exports or corpora), paths relative to $OUT."""
    tarball = cfg.out / "gpu_check_logs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for top in (cfg.logs, cfg.runs):
            for path in sorted(top.rglob("*")):
                if path.is_file() and (path.suffix == ".log" or path.name == "metrics.jsonl"):
                    tar.add(path, arcname=str(path.relative_to(cfg.out)))
    return tarball


def write_json(path: Path, obj: object) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")


def load(path: Path, default: object = None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------------------
# Probes: run under GPU_CHECK_PYTHON (which may not be the driver's Python), in the steps' environment.
# They import torch and the packages being checked; the driver above never does.

def quiet(cmd: list[str], timeout: int = 20) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout + p.stderr).strip() if p.returncode == 0 else None


def first_line(text: str | None) -> str | None:
    return text.splitlines()[0].strip() if text else None


def try_import(name: str) -> str | None:
    try:
        __import__(name)
        return None
    except BaseException as e:  # any failure means "not usable here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def host_facts() -> dict:
    m = {"hostname": os.uname().nodename, "kernel": os.uname().release, "cpu_count": os.cpu_count(),
         "cpus_usable": cpus_usable(), "python": sys.version.split()[0], "python_exe": sys.executable}
    try:
        meminfo = Path("/proc/meminfo").read_text()
        m["mem_total_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1]) / 2**20, 1)
    except (OSError, TypeError):
        m["mem_total_gib"] = None
    try:
        m["shm_free_mib"] = shutil.disk_usage("/dev/shm").free // 2**20
    except OSError:
        m["shm_free_mib"] = 0
    smi = m["nvidia_smi"] = shutil.which("nvidia-smi")
    if smi:
        q = quiet([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        m["gpus"] = [dict(zip(("name", "memory", "driver"), [x.strip() for x in line.split(",")]))
                     for line in (q or "").splitlines() if line.strip()]
        cv = re.search(r"CUDA Version:\s*([\d.]+)", quiet([smi]) or "")
        m["cuda_driver_version"] = cv[1] if cv else None
    for tool in ("mpirun", "mpicxx", "nvcc", "cmake", "c++", "ninja"):
        path = shutil.which(tool)
        out = quiet([path, "--version"]) if path else None
        if tool == "nvcc":
            m[tool] = {"path": path, "version": next((x for x in out.splitlines() if "release" in x),
                                                     first_line(out)) if out else out}
        else:
            m[tool] = {"path": path, "version": first_line(out)}
    return m


def torch_facts() -> dict:
    try:
        import torch
    except BaseException as e:  # a broken torch is a finding, not a crash
        return {"error": f"{type(e).__name__}: {e}"}
    t = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        t["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # reported as found
        t["nccl"] = f"unavailable ({type(e).__name__})"
    if t["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        t.update(device_count=torch.cuda.device_count(), device=p.name, capability=f"{p.major}.{p.minor}",
                 memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    return t


def probe_machine(out_json: str) -> int:
    m = host_facts()
    m["torch"] = torch_facts()
    write_json(Path(out_json), m)
    print(json.dumps(m, indent=1, default=str))
    return 0 if "version" in m["torch"] else 1


def read_manifest(wheels: Path) -> list[list[str]] | None:
    f = Path(wheels, "manifest.tsv")
    if not f.is_file():
        return None
    return [line.split("\t")[:3] for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")]


def probe_missing(wheels: str, out_txt: str, out_json: str) -> int:
    rows = read_manifest(Path(wheels))
    rec: dict = {"wheelhouse": wheels}
    if rows is None:
        rec["note"] = f"{'manifest.tsv' if Path(wheels).is_dir() else 'wheelhouse'} missing: {PREPARE}"
        rows = []
    need = [f"{dist}=={ver}" for dist, ver, mod in rows if try_import(mod)]
    rec.update(present=[d for d, v, _ in rows if f"{d}=={v}" not in need], missing_before=need)
    Path(out_txt).write_text("".join(n + "\n" for n in need))
    write_json(Path(out_json), rec)
    print(json.dumps(rec, indent=1))
    return 0


def probe_importable(out_json: str) -> int:
    res = {name: (try_import(name) or "ok") for name, _ in RUNTIME}
    vers = {}
    for name in ("torch", "numpy", "transformers", "tokenizers", "tensorboard", "tqdm", "huggingface_hub"):
        try:
            vers[name] = getattr(__import__(name), "__version__", "?")
        except BaseException:  # absent or broken: no version to report
            pass
    bad = [n for n, critical in RUNTIME if critical and res[n] != "ok"]
    write_json(Path(out_json), {"imports": res, "versions": vers, "critical_missing": bad})
    print(json.dumps({"imports": res, "versions": vers}, indent=1))
    return 1 if bad else 0


def find_nccl() -> tuple[str | None, list[str] | None]:
    """NCCL's include folder and libraries: HOROVOD_NCCL_HOME, the system, or torch's nvidia-nccl wheel."""
    roots = [os.environ.get("HOROVOD_NCCL_HOME", ""), "/usr", "/usr/local/cuda", "/usr/local"]
    roots += [p for p in sys.path if p.endswith("site-packages")]
    for r in filter(None, roots):
        inc = None
        for pattern in ("include/nccl.h", "nvidia/nccl/include/nccl.h", "nvidia/*/include/nccl.h", "nvidia/**/nccl.h"):
            hits = sorted(glob.glob(os.path.join(r, pattern), recursive=True))
            if hits and not inc:
                inc = os.path.dirname(hits[0])
        if inc:
            libs = sorted(glob.glob(os.path.join(os.path.dirname(inc), "lib*", "libnccl.so*")) +
                          glob.glob(os.path.join(r, "lib", "x86_64-linux-gnu", "libnccl.so*")))
            if libs:
                return inc, libs
    return None, None


def probe_buildenv(work: str, out_json: str) -> int:
    """torch's pip NCCL has only libnccl.so.2: a libnccl.so link beside it in `work` is what the build links."""
    inc, libs = find_nccl()
    env = {"HOROVOD_NCCL_LINK": "SHARED"}
    rec: dict = {"nccl_include": inc, "nccl_libs": libs}
    if inc and libs:
        libdir = os.path.dirname(libs[0])
        if not any(os.path.basename(x) == "libnccl.so" for x in libs):
            libdir = os.path.join(work, "nccl-lib")
            os.makedirs(libdir, exist_ok=True)
            target = os.path.join(libdir, "libnccl.so")
            if not os.path.lexists(target):
                os.symlink(libs[0], target)
        env.update(HOROVOD_NCCL_INCLUDE=inc, HOROVOD_NCCL_LIB=libdir)
        rec.update(nccl_lib_dir=libdir, nccl_runtime_dir=os.path.dirname(libs[0]))
    cuda_nvcc = "/usr/local/cuda/bin/nvcc"
    nvcc = shutil.which("nvcc") or (cuda_nvcc if os.path.exists(cuda_nvcc) else None)
    if nvcc:
        env["HOROVOD_CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    rec["nvcc"] = nvcc
    write_json(Path(out_json), {**rec, "env": env})
    return 0


def probe_interpreter() -> int:
    info = {"executable": sys.executable, "version": sys.version.split()[0], "version_ok": sys.version_info >= (3, 11)}
    err = try_import("torch")
    if err:
        info["torch_error"] = err
    else:
        import torch
        info["torch"] = (f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                         f"GPU visible: {torch.cuda.is_available()}")
    print(json.dumps(info))
    return 0


def probe_loss_scales(run_dir: str) -> int:
    """The GradScaler state saved in each checkpoint ("scaler": GradScaler.state_dict())."""
    scales: dict = {}
    try:
        import torch
        for ck in sorted(Path(run_dir, "checkpoints").glob("ckpt-*.pt")):
            s = torch.load(ck, map_location="cpu", weights_only=True).get("scaler") or {}
            scales[ck.name] = {k: s.get(k) for k in ("scale", "_growth_tracker") if k in s}
    except Exception as e:  # reported in the JSON
        scales["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(scales, default=str))
    return 0


PROBES = {"machine": probe_machine, "missing": probe_missing, "importable": probe_importable,
          "buildenv": probe_buildenv, "interpreter": probe_interpreter, "loss-scales": probe_loss_scales}
PROBE_ARGS = {"machine": 1, "missing": 3, "importable": 1, "buildenv": 2, "interpreter": 0, "loss-scales": 1}


def probe(args: list[str]) -> int:
    name = args[0] if args else ""
    if name not in PROBES:
        raise UsageError(f"probe {name!r} (allowed: {', '.join(PROBES)})")
    if len(args) - 1 != PROBE_ARGS[name]:
        raise UsageError(f"probe {name} takes {PROBE_ARGS[name]} argument(s), got {len(args) - 1}: {args[1:]}")
    return PROBES[name](*args[1:])


# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> bool:
    """--dry-run or nothing; -h/--help prints the help."""
    dry = False
    for arg in argv:
        if arg == "--dry-run":
            dry = True
        elif arg in ("-h", "--help"):
            print(__doc__.strip(), flush=True)
            sys.exit(0)
        else:
            raise UsageError(f"unknown argument {arg!r} (allowed: --dry-run, -h, --help)")
    return dry


def gpu_check(dry: bool) -> int:
    cfg = load_config(dry)
    clear_outputs(cfg)
    if not shutil.which(cfg.python):
        refuse(cfg, f"no Python: GPU_CHECK_PYTHON={cfg.python} not found (allowed: a Python on PATH or its path, "
                    "one that holds the machine's torch)")
    if not dry and not cfg.wheels.is_dir():
        refuse(cfg, f"GPU_CHECK_WHEELS={cfg.wheels}: no wheelhouse there (allowed: a folder that "
                    f"scripts/gpu_check_prepare.sh filled; --dry-run plans without one)")
    make_folders(cfg)
    prepare_environment(cfg)
    run = GpuCheck(cfg)
    run.run_all()
    print(f"== summary ({int(time.time() - run.started)}s of {cfg.budget_s}s)", flush=True)
    doc = document(run)
    write_json(cfg.json, doc)
    print_summary(doc)
    tarball = None if dry else pack_logs(cfg)
    if not cfg.keep:
        for path in (cfg.state, cfg.logs, cfg.runs):
            shutil.rmtree(path, ignore_errors=True)
    if dry:
        print(f"== dry run: wrote {cfg.json}")
        return 0 if doc["plan_complete"] else 1
    print(f"== wrote {cfg.json} and {tarball} ({int(time.time() - run.started)}s)")
    return 0


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    try:
        if argv[:1] == ["probe"]:
            return probe(argv[1:])
        return gpu_check(parse_args(argv))
    except UsageError as e:
        print(f"{ME}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
