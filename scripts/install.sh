#!/usr/bin/env bash
# One idempotent install: system MPI + compiler, a venv, the pinned Python dependencies
# (requirements/lock.txt: exact versions with hashes: torch, TensorFlow + keras-hub, ...), and ONE Horovod
# wheel (MPI + Gloo + PyTorch + TensorFlow) built once from source and cached.
# Every step says what it is doing; the first failure stops with the step's name.
#   HPCTRAIN_VENV=dir          where the venv goes (default .venv)
#   HPCTRAIN_FRAMEWORKS=list   torch,tf (default) or torch: with torch alone the lock's TensorFlow-only packages
#                              (scripts/lock_select.py) are left out and Horovod is built without TensorFlow
#   HPCTRAIN_TORCH=spec        a site's own torch build, e.g. "torch==2.13.0" with TORCH_INDEX_URL set to
#                              PyTorch's CUDA wheel index; the rest still comes from the lock
#   HPCTRAIN_TF=spec           a site's own TensorFlow, e.g. "tensorflow[and-cuda]==2.21.0" on GPU clusters
#                              (the lock's tensorflow is the plain wheel, which also runs on CPU-only machines)
#   HPCTRAIN_DEPS=latest       newest releases of requirements/base.in instead of the lock (make test-latest;
#                              torch, tensorflow and keras-hub stay at their base.in pins there)
#   HPCTRAIN_WHEEL_CACHE=dir   where built Horovod wheels are kept (default ~/.cache/hpctrain/wheels)
#   HOROVOD_GPU_OPERATIONS=NCCL  (exported by the caller) a GPU build of Horovod; cached under its own key
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HPCTRAIN_VENV:-$ROOT/.venv}
LOCK=$ROOT/requirements/lock.txt
DEPS=${HPCTRAIN_DEPS:-locked}
WHEEL_CACHE=${HPCTRAIN_WHEEL_CACHE:-$HOME/.cache/hpctrain/wheels}
HOROVOD_VERSION=$(sed -n 's/^horovod==\([^ ]*\).*/\1/p' "$LOCK")
FRAMEWORKS=${HPCTRAIN_FRAMEWORKS:-torch,tf}
case ",$FRAMEWORKS," in
  ,torch,tf,|,tf,torch,) FRAMEWORKS=torch,tf; WITH_TF=1 ;;
  ,torch,) WITH_TF=0 ;;
  *) echo "install.sh: HPCTRAIN_FRAMEWORKS='$FRAMEWORKS' is not allowed (allowed: torch,tf or torch)" >&2; exit 2 ;;
esac
if [ "$WITH_TF" = 0 ] && [ -n "${HPCTRAIN_TF:-}" ]; then
  echo "install.sh: HPCTRAIN_TF='$HPCTRAIN_TF' set but HPCTRAIN_FRAMEWORKS=torch (allowed: add tf, or unset HPCTRAIN_TF)" >&2; exit 2
fi
HVD_FRAMEWORKS="PyTorch"; [ "$WITH_TF" = 0 ] || HVD_FRAMEWORKS="PyTorch + TensorFlow"
# TensorFlow prints oneDNN / CUDA-stub lines at every import. TF_CPP_MIN_LOG_LEVEL quiets older releases;
# 2.21 logs them through absl before it is initialised, so the script's own TF imports go through quiet().
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
quiet() {  # run "$@" keeping its stdout; show its stderr only if it fails
  local err rc=0
  err=$(mktemp); "$@" 2>"$err" || rc=$?
  [ "$rc" -eq 0 ] || cat "$err" >&2
  rm -f "$err"; return "$rc"
}

step=""
trap 'echo "install.sh: FAILED at step: ${step}" >&2' ERR
say() { step="$1"; echo "== install: $1"; }

say "system packages (Open MPI, cmake, C++ compiler)"
need=()
# A bare Debian/Ubuntu root (a container build) has no Python; venv and headers (Horovod's build) come apart.
if ! command -v python3 >/dev/null; then
  need+=(python3 python3-venv python3-dev)
else
  python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
  [ -e "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || need+=(python3-dev)
fi
command -v mpirun >/dev/null || need+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include ] || dpkg -s libopenmpi-dev >/dev/null 2>&1 || need+=(libopenmpi-dev)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
command -v strace >/dev/null || need+=(strace)  # the tests slow a checkpoint write down with it
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

say "virtual environment at $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if [ "$DEPS" = latest ]; then
  say "newest releases of requirements/base.in (not the lock: make test-latest)"
  stamp=""
  "$PY" "$ROOT/scripts/lock_select.py" --frameworks "$FRAMEWORKS" --drop horovod "$ROOT/requirements/base.in" > "$VENV/.base-latest.in"
  "${PIP[@]}" --upgrade -r "$VENV/.base-latest.in"
else
  say "pinned Python dependencies (requirements/lock.txt)"
  stamp="$(sha256sum "$LOCK" | cut -d' ' -f1) ${HPCTRAIN_TORCH:-} ${HPCTRAIN_TF:-}"
  [ "$WITH_TF" = 1 ] || stamp="$stamp frameworks=$FRAMEWORKS"
  if [ "$(cat "$VENV/.hpctrain-lock" 2>/dev/null)" != "$stamp" ]; then
    drop=horovod  # built below against the installed torch and tensorflow
    if [ -n "${HPCTRAIN_TORCH:-}" ]; then  # the site's torch (e.g. a CUDA build of the pinned version)
      "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$HPCTRAIN_TORCH"
      drop="$drop|torch"
    fi
    if [ -n "${HPCTRAIN_TF:-}" ]; then  # the site's TensorFlow (e.g. tensorflow[and-cuda] of the pinned version)
      "${PIP[@]}" "$HPCTRAIN_TF"
      drop="$drop|tensorflow"
    fi
    "$PY" "$ROOT/scripts/lock_select.py" --frameworks "$FRAMEWORKS" --drop "$drop" "$LOCK" > "$VENV/.lock-install.txt"
    "${PIP[@]}" --require-hashes --no-deps -r "$VENV/.lock-install.txt"
  fi
fi

say "hpctrain package (editable)"
(cd / && "$PY" -c "import hpctrain") 2>/dev/null || "${PIP[@]}" --no-build-isolation --no-deps -e .

say "Horovod $HOROVOD_VERSION (MPI + Gloo + $HVD_FRAMEWORKS, one wheel)"
hvd_tf=""; [ "$WITH_TF" = 0 ] || hvd_tf="horovod.tensorflow, "
if [ "$("$PY" -c "import horovod.torch, ${hvd_tf}horovod; print(horovod.__version__)" 2>/dev/null)" != "$HOROVOD_VERSION" ]; then
  # The built wheel is tied to the Python, torch and TensorFlow it was compiled against: key the cache on
  # all three (and on a GPU build), e.g. py311-torch2.13.0+cpu-tf2.21.0, or py311-torch2.13.0+cpu-notf.
  if [ "$WITH_TF" = 1 ]; then
    key=$(quiet "$PY" -c "import sys, torch, tensorflow as tf; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-tf{tf.__version__}')")
  else
    key=$("$PY" -c "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-notf')")
  fi
  gpu_ops=${HOROVOD_GPU_OPERATIONS:-}
  [ -z "$gpu_ops" ] || key="$key-gpu${gpu_ops,,}"
  cache="$WHEEL_CACHE/$key"
  mkdir -p "$cache"
  if ! ls "$cache"/horovod-$HOROVOD_VERSION-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION from source (3-8 minutes on 2 cores; cached afterwards in $cache)"
    # Two workarounds, both needed for one wheel with both frameworks:
    # - PyTorch >= 2.1 needs C++17 but Horovod 0.28.1 passes -std=c++14: scripts/cxx17-shim.sh (horovod#3996).
    # - TensorFlow >= 2.19 wheels keep headers xla_mpi_ops.cc includes elsewhere (horovod PR #4302, unreleased):
    #   highwayhash and farmhash under external/, and the old tensorflow/compiler/xla/client/xla_builder.h
    #   is now xla/hlo/builder/xla_builder.h (a one-line forwarding header, generated here).
    fwd=$(mktemp -d "${TMPDIR:-/tmp}/hpctrain-tfinc.XXXXXX")
    trap 'rm -rf "$fwd"' EXIT
    tf_cxxflags=""
    tf_switch=(HOROVOD_WITHOUT_TENSORFLOW=1)
    if [ "$WITH_TF" = 1 ]; then
      TFINC=$(quiet "$PY" -c "import tensorflow as tf; print(tf.sysconfig.get_include())")
      for d in "$TFINC/external/highwayhash" "$TFINC/external/farmhash_archive/src"; do
        [ ! -d "$d" ] || tf_cxxflags="$tf_cxxflags -I$d"
      done
      if [ ! -e "$TFINC/tensorflow/compiler/xla/client/xla_builder.h" ] && [ -e "$TFINC/xla/hlo/builder/xla_builder.h" ]; then
        mkdir -p "$fwd/tensorflow/compiler/xla/client"
        echo '#include "xla/hlo/builder/xla_builder.h"' > "$fwd/tensorflow/compiler/xla/client/xla_builder.h"
        tf_cxxflags="$tf_cxxflags -I$fwd"
      fi
      tf_switch=(HOROVOD_WITH_TENSORFLOW=1)
    fi
    env -u HOROVOD_WITHOUT_TENSORFLOW -u HOROVOD_WITHOUT_PYTORCH -u HOROVOD_WITH_TENSORFLOW \
    CXX="$ROOT/scripts/cxx17-shim.sh" CXXFLAGS="${CXXFLAGS:-}$tf_cxxflags" \
    HOROVOD_WITH_PYTORCH=1 "${tf_switch[@]}" HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-MPI} \
    MAKEFLAGS=-j"$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir --require-hashes -w "$cache" \
        -r <(awk '/^[^ #]/ { skip = ($1 !~ /^horovod==/) } !skip' "$LOCK")
    rm -rf "$fwd"
  fi
  # --force-reinstall: pip skips a local wheel of the version already installed (e.g. an older PyTorch-only build)
  "${PIP[@]}" --no-deps --force-reinstall "$cache"/horovod-$HOROVOD_VERSION-*.whl
fi

required=(PyTorch MPI); [ "$WITH_TF" = 0 ] || required=(PyTorch TensorFlow MPI)
[ "${HOROVOD_GPU_OPERATIONS:-}" != NCCL ] || required+=(NCCL)
what="MPI, PyTorch and TensorFlow"; [ "$WITH_TF" = 1 ] || what="MPI and PyTorch"
[ "${HOROVOD_GPU_OPERATIONS:-}" != NCCL ] || what="$what, NCCL"
say "verifying Horovod (horovodrun --check-build: $what)"
out=$(PATH="$VENV/bin:$PATH" quiet "$VENV/bin/horovodrun" --check-build)
for fw in "${required[@]}"; do
  echo "$out" | grep -q "\[X\] $fw" || {
    echo "$out"
    echo "install.sh: Horovod in $VENV lacks $fw ('[ ] $fw' above): delete its wheel under $WHEEL_CACHE/ and rerun" >&2
    false
  }
done
echo "$out" | grep -E '\[X\] (PyTorch|TensorFlow)' | sed 's/^ */   horovod: /'
[ -z "$stamp" ] || echo "$stamp" > "$VENV/.hpctrain-lock"
echo "== install: done ($VENV)"
