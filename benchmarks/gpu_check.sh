#!/usr/bin/env bash
# hpctrain on one GPU, as ONE prepared command for a lent GPU machine (no internet, no Horovod, maybe no
# MPI; a Python with a CUDA torch + NCCL, cmake and a C++ compiler). Writes ONE JSON, $OUT/gpu_check.json
# (machine info + every figure + each step's command, status, seconds and log tail), beside
# $OUT/gpu_check_logs.tar.gz (every step's log and each run's metrics.jsonl; no checkpoints).
#
#   bash benchmarks/gpu_check.sh             # the real thing: ~7 min at most (GPU_CHECK_BUDGET_S)
#   bash benchmarks/gpu_check.sh --dry-run   # print each step's command, write the JSON skeleton, check what
#                                            # can be checked here (wheelhouse, python, torch); runs nothing heavy
# From a session, with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-check-wheels"],
# timeout_s=540); fill the wheelhouse first, here, with scripts/gpu_check_prepare.sh.
#
# Steps, in order, each timed and under `timeout`; a failure is recorded (status, rc, log tail, error lines)
# and the steps that do not depend on it still run:
#   01 machine_info          nvidia-smi, python/torch/CUDA/NCCL/cuDNN versions, mpirun, nvcc, cmake, cores, /dev/shm
#   02 install_deps          what hpctrain imports and the machine lacks, offline from the wheelhouse
#   03 horovod_build         Horovod (lock version) from the carried sdist: NCCL GPU ops, PyTorch, Gloo (+MPI)
#   04 horovod_check_build   horovodrun --check-build
#   05/06 resnet50_fp16/bf16 hpctrain ResNet-50 synthetic 224 px, batch 256, 60 steps, horovodrun -np 1
#                            (--backend none when Horovod did not build)
#   07/08 plain_resnet50_*   benchmarks/plain_horovod.py at the same settings (the like-for-like peer)
#   09 bert_base_bf16        hpctrain BERT-base MLM, bf16, built-in corpus, 40 steps
#   10 ddp_resnet50_fp16     --backend ddp (NCCL) under torchrun --nproc_per_node 1, 30 steps
#   11/12 resume_fp16_*      20 steps with checkpoints every 10, then the same run dir to 30: resumed at
#                            step 20? GradScaler loss scale read from the checkpoints
#
# Environment (all optional):
#   OUT                      output folder (default ./gpu-check-out); run dirs go to $OUT/runs during the run
#   GPU_CHECK_WHEELS         wheelhouse (default .gpu-check-wheels in the repo; scripts/gpu_check_prepare.sh)
#   GPU_CHECK_PYTHON         the Python that holds the machine's torch (default python3)
#   GPU_CHECK_WORK           scratch for the Horovod build and the installed packages (default $TMPDIR/hpctrain-gpu-check)
#   GPU_CHECK_BUDGET_S       whole-run budget in seconds (default 420); a step never runs past it, a step that
#                            cannot get GPU_CHECK_MIN_STEP_S (default 20) is recorded as skipped
#   GPU_CHECK_BUILD_TIMEOUT_S  the Horovod build's own limit (default 240)
#   GPU_CHECK_KEEP=1         keep $OUT/runs, $OUT/logs and the state folder (default: packed, then removed,
#                            since the device tool brings back at most 8 files from $OUT)
# Why `pip install --target` + PYTHONPATH and not a venv: the device's python3 is itself a venv
# (/opt/torch/.venv, KINDS.md); a venv made from it with --system-site-packages sees the BASE interpreter's
# site-packages, not that venv's, so its CUDA torch would vanish; `pip install --user` is refused inside a
# venv. A --target folder first on PYTHONPATH adds only what is missing, works with any interpreter layout,
# and leaves the machine's torch alone.
set -uo pipefail   # no -e: a failed step is recorded and the script goes on
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-$ROOT/gpu-check-out}
if ! mkdir -p "$OUT" || ! OUT=$(cd "$OUT" && pwd); then echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; fi
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.gpu-check-wheels}
PY=${GPU_CHECK_PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/hpctrain-gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
MIN_STEP=${GPU_CHECK_MIN_STEP_S:-20}
BUILD_TIMEOUT=${GPU_CHECK_BUILD_TIMEOUT_S:-240}
RESERVE=15                       # seconds kept for writing the JSON and packing the logs
STATE=$OUT/.gpu-check-state
LOGS=$OUT/logs
RUNS=$OUT/runs
SITE=$WORK/site
HELPER=$WORK/gpu_check_helper.py   # outside $OUT: the commands recorded in the JSON stay valid there
JSON=$OUT/gpu_check.json
HVD_VERSION=$(sed -n 's/^horovod==\([^ ]*\).*/\1/p' "$ROOT/requirements/lock.txt")
SDIST=$WHEELS/horovod-$HVD_VERSION.tar.gz
START=$(date +%s)

rm -rf "$STATE" "$LOGS" "$RUNS" "$JSON" "$OUT/gpu_check_logs.tar.gz"
mkdir -p "$STATE/steps" "$LOGS" "$RUNS" "$WORK"
if [ "$DRY" = 0 ]; then
  rm -rf "$SITE" "$WORK/wheel" "$WORK/nccl-lib"
  mkdir -p "$SITE" "$WORK/wheel"
fi

if ! command -v "$PY" >/dev/null 2>&1; then
  # Nothing below works without Python: say so in the one JSON and stop.
  printf '{"dry_run": %s, "error": "no Python: %s not found (set GPU_CHECK_PYTHON)", "steps": []}\n' \
    "$([ "$DRY" = 1 ] && echo true || echo false)" "$PY" > "$JSON"
  echo "gpu_check.sh: $PY not found; wrote $JSON" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------------
# The Python helper: machine info, import checks, figures from each run, the dry-run checks, the JSON.
cat > "$HELPER" <<'PYEOF'
import glob, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

ANCHOR = {"images_per_s": 2470, "what": "NVIDIA DeepLearningExamples ResNet-50 v1.5 (PyTorch), AMP training, "
          "one A100, batch 256, as given in the task brief (not re-checked here)",
          "note": "not like for like: DALI input pipeline, channels-last, another GPU; hpctrain here reads "
                  "synthetic images through its own loader, NCHW"}
# What hpctrain's PyTorch path imports at run time (torch beside). critical: a run cannot start without it.
RUNTIME = [("torch", True), ("numpy", True), ("PIL", True), ("tqdm", True), ("transformers", True),
           ("tokenizers", True), ("tensorboard.summary", False), ("yaml", False), ("psutil", False),
           ("cloudpickle", False), ("packaging", False), ("cffi", False)]


def run(cmd, timeout=20):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip() if p.returncode == 0 else None
    except Exception:
        return None


def first_line(text):
    return text.splitlines()[0].strip() if text else None


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")


def machine(out_json, out_env):
    m = {"hostname": os.uname().nodename, "kernel": os.uname().release, "cpu_count": os.cpu_count(),
         "cpus_usable": len(os.sched_getaffinity(0)), "python": sys.version.split()[0], "python_exe": sys.executable}
    try:
        m["mem_total_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 2**20, 1)
    except Exception:
        m["mem_total_gib"] = None
    try:
        m["shm_free_mib"] = shutil.disk_usage("/dev/shm").free // 2**20
    except Exception:
        m["shm_free_mib"] = 0
    smi = shutil.which("nvidia-smi")
    m["nvidia_smi"] = smi
    if smi:
        q = run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        m["gpus"] = [dict(zip(("name", "memory", "driver"), [x.strip() for x in line.split(",")]))
                     for line in (q or "").splitlines() if line.strip()]
        full = run([smi]) or ""
        cv = re.search(r"CUDA Version:\s*([\d.]+)", full)
        m["cuda_driver_version"] = cv[1] if cv else None
    for tool, args in (("mpirun", ["--version"]), ("mpicxx", ["--version"]), ("nvcc", ["--version"]),
                       ("cmake", ["--version"]), ("c++", ["--version"]), ("ninja", ["--version"])):
        path = shutil.which(tool)
        out = run([path, *args]) if path else None
        if tool == "nvcc" and out:
            out = next((l for l in out.splitlines() if "release" in l), first_line(out))
        m[tool] = {"path": path, "version": first_line(out) if tool != "nvcc" else out}
    t = {}
    try:
        import torch
        t = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
        try:
            t["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:
            t["nccl"] = f"unavailable ({type(e).__name__})"
        if t["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            t.update(device_count=torch.cuda.device_count(), device=p.name,
                     capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                     multiprocessors=p.multi_processor_count)
    except Exception as e:
        t = {"error": f"{type(e).__name__}: {e}"}
    m["torch"] = t
    write_json(out_json, m)
    cap = t.get("capability", "9.0").replace(".", "")
    env = {"HAVE_GPU": int(bool(t.get("cuda_available"))), "GPU_CC": cap, "NPROC": m["cpus_usable"],
           "SHM_MIB": m["shm_free_mib"], "HAVE_TORCH": int("version" in t)}
    Path(out_env).write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    print(json.dumps(m, indent=1, default=str))
    return 0 if "version" in t else 1


def read_manifest(wheels):
    f = Path(wheels, "manifest.tsv")
    if not f.is_file():
        return None
    return [line.split("\t")[:3] for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")]


def try_import(name):
    try:
        __import__(name)
        return None
    except BaseException as e:  # noqa: BLE001 - any failure means "not usable here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def missing(wheels, out_txt, out_json):
    rows = read_manifest(wheels)
    rec = {"wheelhouse": str(wheels)}
    if rows is None:
        rec["note"] = "wheelhouse missing: run scripts/gpu_check_prepare.sh"
        rows = []
    need = [f"{dist}=={ver}" for dist, ver, mod in rows if try_import(mod)]
    rec.update(present=[d for d, v, m in rows if f"{d}=={v}" not in need], missing_before=need)
    Path(out_txt).write_text("".join(n + "\n" for n in need))
    write_json(out_json, rec)
    print(json.dumps(rec, indent=1))
    return 0


def importable(out_json, out_env):
    res = {name: (try_import(name) or "ok") for name, _ in RUNTIME}
    vers = {}
    for name in ("torch", "numpy", "transformers", "tokenizers", "tensorboard", "tqdm", "huggingface_hub"):
        try:
            vers[name] = getattr(__import__(name), "__version__", "?")
        except BaseException:
            pass
    bad = [n for n, critical in RUNTIME if critical and res[n] != "ok"]
    write_json(out_json, {"imports": res, "versions": vers, "critical_missing": bad})
    Path(out_env).write_text(f"TB_OK={int(res['tensorboard.summary'] == 'ok')}\n")
    print(json.dumps({"imports": res, "versions": vers}, indent=1))
    return 1 if bad else 0


def buildenv(work, out_env, out_json):
    """Where the NCCL headers/library and nvcc are (torch's pip NCCL has only libnccl.so.2: link it)."""
    roots = [os.environ.get("HOROVOD_NCCL_HOME", ""), "/usr", "/usr/local/cuda", "/usr/local"]
    roots += [p for p in sys.path if p.endswith("site-packages")]
    inc = lib = None
    for r in filter(None, roots):
        for pattern in ("include/nccl.h", "nvidia/nccl/include/nccl.h", "nvidia/*/include/nccl.h",
                        "nvidia/**/nccl.h"):
            hits = sorted(glob.glob(os.path.join(r, pattern), recursive=True))
            if hits and not inc:
                inc = os.path.dirname(hits[0])
        if inc:
            base = os.path.dirname(inc)
            libs = sorted(glob.glob(os.path.join(base, "lib*", "libnccl.so*")) +
                          glob.glob(os.path.join(r, "lib", "x86_64-linux-gnu", "libnccl.so*")))
            if libs:
                lib = libs
                break
            inc = None
    env = {"HOROVOD_NCCL_LINK": "SHARED"}
    rec = {"nccl_include": inc, "nccl_libs": lib}
    if inc and lib:
        libdir = os.path.dirname(lib[0])
        if not any(os.path.basename(x) == "libnccl.so" for x in lib):
            libdir = os.path.join(work, "nccl-lib")
            os.makedirs(libdir, exist_ok=True)
            target = os.path.join(libdir, "libnccl.so")
            if not os.path.lexists(target):
                os.symlink(lib[0], target)
        env.update(HOROVOD_NCCL_INCLUDE=inc, HOROVOD_NCCL_LIB=libdir)
        rec["nccl_lib_dir"] = libdir
        rec["nccl_runtime_dir"] = os.path.dirname(lib[0])
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        env["HOROVOD_CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    rec["nvcc"] = nvcc
    Path(out_env).write_text("".join(f"{k}={v}\n" for k, v in env.items()) +
                             f"NCCL_RUNTIME_DIR={rec.get('nccl_runtime_dir', '')}\n")
    write_json(out_json, {**rec, "env": env})
    return 0


def figures(kind, run_dir, log, out_json):
    fig = {}
    if kind in ("hpctrain", "resume"):
        f = Path(run_dir, "metrics.jsonl")
        rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []
        train = [r for r in rows if r.get("kind") == "train"]
        fig["intervals"] = [{"step": r["step"], "samples_per_s": round(r["samples_per_s_total"], 1),
                             "loss": round(r["loss"], 4)} for r in train]
        if train:
            # The first interval holds the start-up (cuDNN choices, allocator growth, loader warm-up).
            steady = train[1:] or train
            fig["samples_per_s"] = round(steady[-1]["samples_per_s_total"], 1)
            fig["samples_per_s_mean_after_first_interval"] = round(
                sum(r["samples_per_s_total"] for r in steady) / len(steady), 1)
            fig["last_step"], fig["final_loss"] = train[-1]["step"], round(train[-1]["loss"], 4)
    if kind == "plain":
        # horovodrun prefixes each line of a rank ("[0]<stdout>:"): take the JSON object wherever it starts.
        text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
        found = re.findall(r'(\{[^\n]*"samples_per_s_total"[^\n]*\})', text)
        if found:
            rec = json.loads(found[-1])
            fig["samples_per_s"] = round(rec["samples_per_s_total"], 1)
            fig.update({k: rec[k] for k in ("device", "amp") if k in rec})
    if kind == "resume":
        text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
        m = re.search(r"resumed from (\S+) at step (\d+)", text)
        fig["resumed_from"] = m[1] if m else None
        fig["resumed_at_step"] = int(m[2]) if m else None
        fig["resumed_at_step_20"] = bool(m and m[2] == "20")
        scales = {}
        try:
            import torch
            for ck in sorted(Path(run_dir, "checkpoints").glob("ckpt-*.pt")):
                s = torch.load(ck, map_location="cpu", weights_only=True).get("scaler") or {}
                scales[ck.name] = {k: s.get(k) for k in ("scale", "_growth_tracker") if k in s}
        except Exception as e:
            scales["error"] = f"{type(e).__name__}: {e}"
        fig["loss_scale_by_checkpoint"] = scales
    write_json(out_json, fig)
    return 0


def wheel_ok(filename, minor):
    parts = filename[:-4].split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    pys = py.split(".")
    plat_ok = plat == "any" or ("x86_64" in plat and ("manylinux" in plat or "linux" in plat))
    if not plat_ok:
        return False
    if abi == "none":
        return any(p in ("py3", f"cp3{minor}", f"py3{minor}") for p in pys)
    if abi == "abi3":
        return any(p.startswith("cp3") and int(p[3:]) <= minor for p in pys)
    return f"cp3{minor}" in abi.split(".")


def checks(wheels, sdist, out_json):
    res = []
    add = lambda name, ok, detail: res.append({"check": name, "ok": bool(ok), "detail": detail})
    w = Path(wheels)
    if not w.is_dir():
        add("wheelhouse", False, "wheelhouse missing: run scripts/gpu_check_prepare.sh")
    else:
        files = sorted(p.name for p in w.iterdir())
        size = sum(p.stat().st_size for p in w.iterdir() if p.is_file())
        add("wheelhouse", True, f"{w}: {len(files)} files, {size / 2**20:.1f} MiB (the device tool carries 64 MiB in all)")
        add("horovod sdist", Path(sdist).is_file(), os.path.basename(sdist) + (" present" if Path(sdist).is_file() else " missing: run scripts/gpu_check_prepare.sh"))
        rows = read_manifest(w)
        if rows is None:
            add("manifest", False, "manifest.tsv missing: run scripts/gpu_check_prepare.sh")
        else:
            whls = [f for f in files if f.endswith(".whl")]
            norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
            for minor in (11, 12, 13):
                lacking = [f"{d}=={v}" for d, v, _ in rows
                           if not any(norm(f.split("-")[0]) == norm(d) and f.split("-")[1] == v and wheel_ok(f, minor)
                                      for f in whls)]
                add(f"wheels for CPython 3.{minor}", not lacking,
                    f"all {len(rows)} step-2 packages" if not lacking else f"lacking: {', '.join(lacking)}")
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    add("python", sys.version_info >= (3, 11), f"{sys.executable} {sys.version.split()[0]} (hpctrain needs >= 3.11)")
    err = try_import("torch")
    if err:
        add("torch import", False, err)
    else:
        import torch
        add("torch import", True, f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"GPU visible: {torch.cuda.is_available()}")
    for tool in ("nvidia-smi", "nvcc", "mpirun", "cmake", "c++", "timeout", "tar"):
        path = shutil.which(tool)
        required = tool in ("timeout", "tar")
        res.append({"check": f"{tool} present", "ok": bool(path), "required": required,
                    "detail": (path or "not here") + ("" if required else " (reported, not required here)")})
    write_json(out_json, res)
    return 0


def tail(path, n=25, width=300):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [l[:width] for l in lines[-n:]]


def error_lines(path, n=15):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    pat = re.compile(r"(\berror\b|Error:|FAILED|fatal|Traceback|No such file|not found)", re.I)
    out = []
    for i, l in enumerate(lines):
        if pat.search(l):
            # CMake and compilers put the reason on the lines after the first one
            out += [x[:300] for x in lines[i:i + (4 if "CMake Error" in l or "error:" in l else 1)]]
        if len(out) >= n:
            break
    return out[:n]


def load(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except Exception:
        return default


def assemble(state, out_json, dry, budget, started, out_dir):
    state = Path(state)
    steps = []
    for d in sorted(p for p in (state / "steps").iterdir() if p.is_dir()):
        rd = lambda k, default=None: (d / k).read_text().strip() if (d / k).is_file() else default
        s = {"id": d.name.split("-", 1)[0], "name": rd("name"), "what": rd("what"), "command": rd("cmd"),
             "status": rd("status", "not run"), "timeout_s": int(rd("timeout_s", "0"))}
        if rd("note"):
            s["note"] = rd("note")
        if not dry:
            s["rc"] = int(rd("rc")) if rd("rc") not in (None, "") else None
            s["seconds"] = float(rd("seconds")) if rd("seconds") else None
            log = rd("log")
            if log:
                s["log"] = os.path.relpath(log, out_dir)
                s["log_tail"] = tail(log)
                if s["status"] != "ok":
                    s["error_lines"] = error_lines(log)
            s["figures"] = load(d / "figures.json", {})
        steps.append(s)
    by = {s["name"]: s for s in steps}
    fig = lambda name, key: (by.get(name, {}).get("figures") or {}).get(key)
    ratio = lambda a, b: round(a / b, 3) if a and b else None
    summary = {}
    if not dry:
        rn = {}
        for amp in ("fp16", "bf16"):
            h, p = fig(f"resnet50_{amp}", "samples_per_s"), fig(f"plain_resnet50_{amp}", "samples_per_s")
            rn[amp] = {"hpctrain_images_per_s": h, "plain_horovod_images_per_s": p, "hpctrain_vs_plain": ratio(h, p),
                       "hpctrain_vs_anchor": ratio(h, ANCHOR["images_per_s"]), "plain_vs_anchor": ratio(p, ANCHOR["images_per_s"])}
        d = fig("ddp_resnet50_fp16", "samples_per_s")
        rn["ddp_fp16"] = {"images_per_s": d, "ddp_vs_hpctrain_horovod_fp16": ratio(d, rn["fp16"]["hpctrain_images_per_s"])}
        summary["resnet50_224_batch256"] = rn
        summary["bert_base_bf16_sequences_per_s"] = fig("bert_base_bf16", "samples_per_s")
        summary["resume_fp16"] = {k: fig("resume_fp16_part2", k) for k in
                                  ("resumed_at_step", "resumed_at_step_20", "loss_scale_by_checkpoint")}
        summary["horovod_built"] = by.get("horovod_build", {}).get("status") == "ok"
        summary["backend_used"] = load(state / "backend.json", {})
        summary["step_status"] = {s["name"]: s["status"] for s in steps}
    doc = {"schema": "hpctrain-gpu-check/1", "dry_run": dry,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "budget_s": budget, "total_s": round(time.time() - started, 1),
           "machine": load(state / "machine.json", {}), "settings": load(state / "settings.json", {}),
           "anchor": ANCHOR, "summary": summary, "steps": steps}
    if dry:
        doc["checks"] = load(state / "checks.json", [])
        doc["plan_complete"] = all(s["command"] for s in steps)
    for extra in ("install.json", "importable.json", "buildenv.json"):
        if (state / extra).is_file():
            doc.setdefault("details", {})[extra[:-5]] = load(state / extra)
    write_json(out_json, doc)
    # A short summary for the console (the device tool returns the end of the output).
    for s in steps:
        f = s.get("figures") or {}
        head = f.get("samples_per_s")
        took = "" if dry else f"{s.get('seconds') or 0:>6}s"
        note = "; ".join(s["note"].splitlines()) if s.get("note") else ""
        print(f"  {s['id']} {s['name']:<22} {s['status']:<8} {took}" + (f"  {head} samples/s" if head else "")
              + (f"  ({note})" if note else ""))
    for c in doc.get("checks", []):
        print(f"  check: {c['check']}: {'ok' if c['ok'] else 'NO'}: {c['detail']}")
    if summary:
        print(json.dumps(summary, indent=1, default=str))
    return 0 if not dry or doc["plan_complete"] else 1


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "assemble":
        args = [args[0], args[1], args[2] == "1", int(args[3]), float(args[4]), args[5]]
    sys.exit({"machine": machine, "missing": missing, "importable": importable, "buildenv": buildenv,
              "figures": figures, "checks": checks, "assemble": assemble}[cmd](*args))
PYEOF

# ---------------------------------------------------------------------------------------------------
# Step bookkeeping: $STATE/steps/<id>-<name>/{name,what,cmd,status,rc,seconds,timeout_s,note,log,figures.json}
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
q() { printf '%q' "$1"; }

declare_step() {  # declare_step ID NAME WHAT TIMEOUT CMD
  local dir="$STATE/steps/$1-$2"
  mkdir -p "$dir"
  printf '%s\n' "$2" > "$dir/name"
  printf '%s\n' "$3" > "$dir/what"
  printf '%s\n' "$4" > "$dir/timeout_s"
  printf '%s\n' "$5" > "$dir/cmd"
  echo "== $1 $2 (limit ${4}s)"
  echo "   $5"
}

note() { mkdir -p "$STATE/steps/$1-$2" && printf '%s\n' "$3" >> "$STATE/steps/$1-$2/note"; }

skip() {  # skip ID NAME WHAT CMD REASON
  declare_step "$1" "$2" "$3" 0 "$4"
  if [ "$DRY" = 1 ]; then echo planned > "$STATE/steps/$1-$2/status"; note "$1" "$2" "if run: $5"; return; fi
  echo skipped > "$STATE/steps/$1-$2/status"
  note "$1" "$2" "$5"
  echo "   skipped: $5"
}

run_step() {  # run_step ID NAME WHAT TIMEOUT CMD -> the command's exit status (0 also for a dry run)
  local id=$1 name=$2 what=$3 limit=$4 cmd=$5 dir="$STATE/steps/$1-$2" remaining t0 rc status
  declare_step "$id" "$name" "$what" "$limit" "$cmd"
  if [ "$DRY" = 1 ]; then echo planned > "$dir/status"; return 0; fi
  remaining=$(( $(left) - RESERVE ))
  if [ "$remaining" -lt "$MIN_STEP" ]; then
    echo skipped > "$dir/status"
    note "$id" "$name" "time budget: $(left)s of ${BUDGET}s left"
    echo "   skipped: time budget"
    return 125
  fi
  if [ "$limit" -gt "$remaining" ]; then limit=$remaining; note "$id" "$name" "limit cut to ${limit}s by the budget"; fi
  printf '%s\n' "$limit" > "$dir/timeout_s"
  printf '%s\n' "$LOGS/$id-$name.log" > "$dir/log"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$LOGS/$id-$name.log" 2>&1
  rc=$?
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }' > "$dir/seconds"
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\n' "$rc" > "$dir/rc"
  printf '%s\n' "$status" > "$dir/status"
  echo "   $status (rc $rc, $(cat "$dir/seconds") s)"
  return "$rc"
}

figures() {  # figures ID NAME KIND RUN_DIR: numbers from the run's metrics.jsonl / log, beside the step
  [ "$DRY" = 1 ] && return 0
  "$PY" "$HELPER" figures "$3" "$4" "$LOGS/$1-$2.log" "$STATE/steps/$1-$2/figures.json" >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------------------
# Environment every step sees (recorded in the JSON).
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export PIP_CONFIG_FILE=/dev/null            # the machine's pip config (indexes, constraints) stays out of it
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # the device runs commands as root
PIP="$(q "$PY") -m pip"
HVDRUN="$(q "$PY") -m horovod.runner.launch"  # = horovodrun, without relying on the script's shebang

# 01 machine info ------------------------------------------------------------------------------------
run_step 01 machine_info "nvidia-smi, python/torch/CUDA/NCCL versions, MPI, compilers, cores, /dev/shm" 60 \
  "$(q "$PY") $(q "$HELPER") machine $(q "$STATE/machine.json") $(q "$STATE/machine.env")"
HAVE_GPU=0 GPU_CC=90 NPROC=$(nproc 2>/dev/null || echo 4) SHM_MIB=0
# shellcheck disable=SC1091
[ -f "$STATE/machine.env" ] && . "$STATE/machine.env"
[ "$DRY" = 1 ] && HAVE_GPU=1           # plan the GPU steps even where there is no GPU
MPI=0
if command -v mpirun >/dev/null 2>&1 && command -v mpicxx >/dev/null 2>&1; then MPI=1; fi
# Data-loader workers: each holds up to 2 batches of 256 x 3 x 224 x 224 float32 (154 MB) in /dev/shm.
if [ "$SHM_MIB" -ge 4096 ]; then WORKERS=8; elif [ "$SHM_MIB" -ge 1536 ]; then WORKERS=4; else WORKERS=0; fi
[ "$DRY" = 1 ] && WORKERS=8

# 02 install what is missing, offline ------------------------------------------------------------------
run_step 02 install_deps "import-check hpctrain's runtime packages; pip install --no-deps --no-index from the wheelhouse only the missing ones, into $SITE (PYTHONPATH)" 120 \
  "$(q "$PY") $(q "$HELPER") missing $(q "$WHEELS") $(q "$STATE/missing.txt") $(q "$STATE/install.json") && if [ -s $(q "$STATE/missing.txt") ]; then $PIP install -q --disable-pip-version-check --no-index --find-links $(q "$WHEELS") --no-deps --no-compile --target $(q "$SITE") -r $(q "$STATE/missing.txt"); fi && $(q "$PY") $(q "$HELPER") importable $(q "$STATE/importable.json") $(q "$STATE/importable.env")"
TB_OK=1
# shellcheck disable=SC1091
[ -f "$STATE/importable.env" ] && . "$STATE/importable.env"
[ -d "$WHEELS" ] || note 02 install_deps "wheelhouse missing: run scripts/gpu_check_prepare.sh"
TB_FLAG=""
[ "$TB_OK" = 1 ] || TB_FLAG="--tensorboard false"

# 03 Horovod build -------------------------------------------------------------------------------------
"$PY" "$HELPER" buildenv "$WORK" "$STATE/buildenv.env" "$STATE/buildenv.json" >/dev/null 2>&1 || true
HOROVOD_NCCL_INCLUDE="" HOROVOD_NCCL_LIB="" HOROVOD_CUDA_HOME="" NCCL_RUNTIME_DIR="" HOROVOD_NCCL_LINK=SHARED
# shellcheck disable=SC1091
[ -f "$STATE/buildenv.env" ] && . "$STATE/buildenv.env"
[ -z "$NCCL_RUNTIME_DIR" ] || export LD_LIBRARY_PATH="$NCCL_RUNTIME_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$MPI" = 1 ]; then mpi_env="HOROVOD_WITH_MPI=1"; else mpi_env="HOROVOD_WITHOUT_MPI=1"; fi
REAL_CXX=$(command -v c++ || command -v g++ || echo c++)
# C++17 shim: Horovod 0.28.1 compiles its PyTorch extension with -std=c++14, PyTorch >= 2.1 needs C++17
# (horovod#3996, scripts/install.sh). HOROVOD_BUILD_CUDA_CC_LIST: only this GPU's architecture (the default,
# every architecture nvcc knows, multiplies the CUDA kernels' build time).
build_env="CXX=$(q "$ROOT/scripts/cxx17-shim.sh") HPCTRAIN_REAL_CXX=$(q "$REAL_CXX") HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 $mpi_env HOROVOD_BUILD_CUDA_CC_LIST=$GPU_CC HOROVOD_NCCL_LINK=$HOROVOD_NCCL_LINK"
[ -z "$HOROVOD_NCCL_INCLUDE" ] || build_env="$build_env HOROVOD_NCCL_INCLUDE=$(q "$HOROVOD_NCCL_INCLUDE") HOROVOD_NCCL_LIB=$(q "$HOROVOD_NCCL_LIB")"
[ -z "$HOROVOD_CUDA_HOME" ] || build_env="$build_env HOROVOD_CUDA_HOME=$(q "$HOROVOD_CUDA_HOME") CUDA_HOME=$(q "$HOROVOD_CUDA_HOME")"
# CMAKE_POLICY_VERSION_MINIMUM: CMake >= 4 refuses the bundled gloo's cmake_minimum_required(2.8.12) without it.
build_env="$build_env CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j$NPROC"
build_cmd="env $build_env $PIP wheel -v --disable-pip-version-check --no-index --no-deps --no-build-isolation --no-cache-dir -w $(q "$WORK/wheel") $(q "$SDIST") && $PIP install -q --disable-pip-version-check --no-index --no-deps --no-compile --target $(q "$SITE") $(q "$WORK/wheel")/horovod-$HVD_VERSION-*.whl"
build_what="Horovod $HVD_VERSION from the carried sdist: NCCL GPU ops, PyTorch, Gloo$([ "$MPI" = 1 ] && echo ' + MPI' || echo ', no MPI'), CUDA arch $GPU_CC"
HVD_OK=0
if [ "$DRY" = 0 ] && [ ! -f "$SDIST" ]; then
  skip 03 horovod_build "$build_what" "$build_cmd" "no sdist at $SDIST: run scripts/gpu_check_prepare.sh"
  skip 04 horovod_check_build "horovodrun --check-build" "$HVDRUN --check-build" "Horovod not built"
else
  [ -n "$HOROVOD_NCCL_INCLUDE" ] || [ "$DRY" = 1 ] || note 03 horovod_build "no NCCL headers/library found (torch's nvidia-nccl wheel, /usr): the build will likely fail"
  if run_step 03 horovod_build "$build_what" "$BUILD_TIMEOUT" "$build_cmd"; then
    if run_step 04 horovod_check_build "horovodrun --check-build" 60 "$HVDRUN --check-build" \
       && grep -q '\[X\] PyTorch' "$LOGS/04-horovod_check_build.log" 2>/dev/null; then
      HVD_OK=1
    fi
  elif [ "$DRY" = 0 ]; then
    skip 04 horovod_check_build "horovodrun --check-build" "$HVDRUN --check-build" "Horovod build did not succeed"
  fi
fi
[ "$DRY" = 1 ] && HVD_OK=1

# Launchers for the runs: Horovod's Gloo controller (-np 1 needs no MPI, no ssh); without Horovod, one process.
if [ "$HVD_OK" = 1 ]; then
  HVD1="$HVDRUN -np 1 -H localhost:1 --gloo"
  BACKEND="--backend horovod"; LAUNCH="$HVD1 $(q "$PY")"
else
  BACKEND="--backend none"; LAUNCH="$(q "$PY")"
fi
to_json() {  # to_json FILE KEY VALUE...: a flat JSON object of strings
  "$PY" -c 'import json, sys; a = sys.argv[2:]; json.dump(dict(zip(a[::2], a[1::2])), open(sys.argv[1], "w"), indent=1)' "$@"
}
to_json "$STATE/backend.json" hpctrain_backend "${BACKEND#--backend }" \
  launcher "$([ "$HVD_OK" = 1 ] && echo 'horovodrun -np 1 --gloo' || echo 'python (one process)')" \
  dataloader_workers "$WORKERS" tensorboard "$([ "$TB_OK" = 1 ] && echo on || echo 'off (not importable)')"
COMMON="--progress never --resume never --eval-every-epoch false --workers $WORKERS${TB_FLAG:+ $TB_FLAG}"
RESNET="--dataset synthetic --arch resnet50 --image-size 224 --batch-size 256 --lr 0.01 --warmup-epochs 0 --epochs 1"

gpu_step() {  # gpu_step ID NAME WHAT TIMEOUT CMD: skipped (recorded) where torch sees no GPU
  if [ "$HAVE_GPU" = 1 ]; then run_step "$@"; else skip "$1" "$2" "$3" "$5" "no CUDA device visible to torch (see machine_info)"; fi
}

# 04-08 ResNet-50 on one GPU: hpctrain and the plain Horovod loop, fp16 and bf16 ----------------------------
id=5
for amp in fp16 bf16; do
  rd="$RUNS/resnet50_$amp"
  gpu_step "0$id" "resnet50_$amp" "hpctrain ResNet-50, synthetic 224 px, batch 256, --amp $amp, 60 steps, ${BACKEND#--}" 90 \
    "$LAUNCH -m hpctrain.resnet $BACKEND $RESNET --amp $amp --synthetic-size $((256 * 60)) --max-steps 60 --log-every 20 $COMMON --run-dir $(q "$rd")"
  figures "0$id" "resnet50_$amp" hpctrain "$rd"
  [ "$HVD_OK" = 1 ] || note "0$id" "resnet50_$amp" "Horovod not available: --backend none (one process)"
  id=$((id + 1))
done
for amp in fp16 bf16; do
  plain_cmd="$HVDRUN -np 1 -H localhost:1 --gloo $(q "$PY") benchmarks/plain_horovod.py --device cuda --amp $amp --arch resnet50 --image-size 224 --batch-size 256 --steps 60"
  if [ "$HVD_OK" = 1 ]; then
    gpu_step "0$id" "plain_resnet50_$amp" "benchmarks/plain_horovod.py at the same settings (--amp $amp, 60 steps, 2 warm-up)" 75 "$plain_cmd"
    figures "0$id" "plain_resnet50_$amp" plain ""
  else
    skip "0$id" "plain_resnet50_$amp" "benchmarks/plain_horovod.py at the same settings (--amp $amp)" "$plain_cmd" "Horovod not available"
  fi
  id=$((id + 1))
done

# 09 BERT-base MLM, bf16 -----------------------------------------------------------------------------------
rd="$RUNS/bert_base_bf16"
gpu_step 09 bert_base_bf16 "hpctrain BERT-base MLM, --amp bf16, built-in corpus (prepared on the machine), batch 64, 40 steps, ${BACKEND#--}" 120 \
  "$LAUNCH -m hpctrain.bert $BACKEND --preset base --amp bf16 --batch-size 64 --max-steps 40 --epochs 100 --log-every 10 --corpus-cache $(q "$RUNS/corpus-builtin") --progress never --resume never --eval-every-epoch false${TB_FLAG:+ $TB_FLAG} --run-dir $(q "$rd")"
figures 09 bert_base_bf16 hpctrain "$rd"

# 10 DDP / NCCL on one GPU -----------------------------------------------------------------------------------
rd="$RUNS/ddp_resnet50_fp16"
gpu_step 10 ddp_resnet50_fp16 "hpctrain ResNet-50 --backend ddp (NCCL) under torchrun --nproc_per_node 1, fp16, 30 steps" 75 \
  "$(q "$PY") -m torch.distributed.run --standalone --nproc_per_node 1 -m hpctrain.resnet --backend ddp $RESNET --amp fp16 --synthetic-size $((256 * 30)) --max-steps 30 --log-every 10 $COMMON --run-dir $(q "$rd")"
figures 10 ddp_resnet50_fp16 hpctrain "$rd"

# 11-12 resume with the fp16 GradScaler state ------------------------------------------------------------------
# ResNet-18 (the scaler path is the same; a smaller checkpoint and start-up keep the budget for the figures).
rd="$RUNS/resume_fp16"
RESUME="$LAUNCH -m hpctrain.resnet $BACKEND --dataset synthetic --arch resnet18 --image-size 224 --batch-size 128 --lr 0.01 --warmup-epochs 0 --epochs 1 --synthetic-size $((128 * 30)) --amp fp16 --checkpoint-every 10 --log-every 10 --progress never --eval-every-epoch false --workers $WORKERS${TB_FLAG:+ $TB_FLAG} --run-dir $(q "$rd")"
gpu_step 11 resume_fp16_part1 "ResNet-18 fp16, --checkpoint-every 10 --max-steps 20 (checkpoints at 10 and 20)" 75 "$RESUME --resume auto --max-steps 20"
part1=$?
figures 11 resume_fp16_part1 hpctrain "$rd"
if [ "$part1" = 0 ]; then
  gpu_step 12 resume_fp16_part2 "the same run dir to 30 steps: must say 'resumed from ... at step 20'; loss scale from each checkpoint's 'scaler'" 75 "$RESUME --resume auto --max-steps 30"
  figures 12 resume_fp16_part2 resume "$rd"
else
  [ "$DRY" = 1 ] || skip 12 resume_fp16_part2 "the same run dir to 30 steps" "$RESUME --resume auto --max-steps 30" "part 1 did not succeed"
fi

# ---------------------------------------------------------------------------------------------------
# Settings, the dry-run checks, the JSON, the logs.
to_json "$STATE/settings.json" out "$OUT" wheelhouse "$WHEELS" python "$PY" work "$WORK" budget_s "$BUDGET" \
  build_timeout_s "$BUILD_TIMEOUT" horovod_with_mpi "$MPI" horovod_version "$HVD_VERSION" PYTHONPATH "$PYTHONPATH" \
  PIP_CONFIG_FILE "$PIP_CONFIG_FILE" LD_LIBRARY_PATH "${LD_LIBRARY_PATH:-}"
if [ "$DRY" = 1 ]; then
  "$PY" "$HELPER" checks "$WHEELS" "$SDIST" "$STATE/checks.json"
fi
echo "== summary ($(elapsed)s of ${BUDGET}s)"
"$PY" "$HELPER" assemble "$STATE" "$JSON" "$DRY" "$BUDGET" "$START" "$OUT"
rc=$?
if [ "$DRY" = 1 ]; then
  [ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$STATE" "$LOGS" "$RUNS"
  echo "== dry run: wrote $JSON"
  exit "$rc"
fi
# Pack the logs and each run's metrics (not checkpoints, exports or corpora): the device tool brings back
# at most 8 files from $OUT, 16 MiB each.
(cd "$OUT" && find logs runs -name '*.log' -o -name metrics.jsonl 2>/dev/null | tar -czf gpu_check_logs.tar.gz -T -) || true
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$STATE" "$LOGS" "$RUNS"
echo "== wrote $JSON and $OUT/gpu_check_logs.tar.gz ($(elapsed)s)"
exit 0
