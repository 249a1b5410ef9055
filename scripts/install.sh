#!/usr/bin/env bash
# One idempotent install: system MPI + compiler, a venv, PyTorch, mpi4py, Horovod (built once, cached).
# Every step says what it is doing; the first failure stops with the step's name.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HPCTRAIN_VENV:-$ROOT/.venv}
TORCH_SPEC=${HPCTRAIN_TORCH:-torch==2.13.0}          # a cluster sets e.g. "torch==2.13.0" + TORCH_INDEX_URL for CUDA
HOROVOD_VERSION=0.28.1
WHEEL_CACHE=${HPCTRAIN_WHEEL_CACHE:-$HOME/.cache/hpctrain/wheels}

step=""
trap 'echo "install.sh: FAILED at step: ${step}" >&2' ERR
say() { step="$1"; echo "== install: $1"; }

say "system packages (Open MPI, cmake, C++ compiler)"
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include ] || dpkg -s libopenmpi-dev >/dev/null 2>&1 || need+=(libopenmpi-dev)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

say "virtual environment at $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

say "PyTorch ($TORCH_SPEC) and Python dependencies"
"$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
"$PY" -c "import numpy, PIL, tensorboard, tqdm, pytest, mpi4py, cloudpickle, psutil, yaml, cffi, packaging, wheel, matplotlib, transformers, tokenizers" \
  2>/dev/null || "${PIP[@]}" numpy pillow tensorboard tqdm pytest mpi4py cloudpickle psutil pyyaml cffi packaging wheel matplotlib transformers tokenizers

say "hpctrain package (editable)"
(cd / && "$PY" -c "import hpctrain") 2>/dev/null || "${PIP[@]}" --no-build-isolation --no-deps -e .

say "Horovod $HOROVOD_VERSION (MPI + Gloo + PyTorch)"
if ! "$PY" -c "import horovod.torch" 2>/dev/null; then
  # The built wheel is tied to the Python and torch it was compiled against: key the cache on both.
  key=$("$PY" -c "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}')")
  cache="$WHEEL_CACHE/$key"
  mkdir -p "$cache"
  if ! ls "$cache"/horovod-$HOROVOD_VERSION-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION from source (about 6 minutes on 2 cores; cached afterwards in $cache)"
    CXX="$ROOT/scripts/cxx17-shim.sh" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITHOUT_TENSORFLOW=${HOROVOD_WITHOUT_TENSORFLOW:-1} HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-MPI} \
    MAKEFLAGS=-j"$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$cache" "horovod==$HOROVOD_VERSION"
  fi
  "${PIP[@]}" --no-deps "$cache"/horovod-$HOROVOD_VERSION-*.whl
fi

say "verifying Horovod (horovodrun --check-build)"
out=$(PATH="$VENV/bin:$PATH" "$VENV/bin/horovodrun" --check-build)
echo "$out" | grep -q "\[X\] PyTorch" || { echo "$out"; false; }
echo "$out" | grep -q "\[X\] MPI" || { echo "$out"; false; }
echo "== install: done ($VENV)"
