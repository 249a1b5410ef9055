#!/usr/bin/env bash
# One idempotent install: system MPI + compiler, a venv, the pinned Python dependencies
# (requirements/lock.txt: exact versions with hashes), Horovod built once from source and cached.
# Every step says what it is doing; the first failure stops with the step's name.
#   HPCTRAIN_VENV=dir          where the venv goes (default .venv)
#   HPCTRAIN_TORCH=spec        a site's own torch build, e.g. "torch==2.13.0" with TORCH_INDEX_URL set to
#                              PyTorch's CUDA wheel index; the rest still comes from the lock
#   HPCTRAIN_DEPS=latest       newest releases of requirements/base.in instead of the lock (make test-latest)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HPCTRAIN_VENV:-$ROOT/.venv}
LOCK=$ROOT/requirements/lock.txt
DEPS=${HPCTRAIN_DEPS:-locked}
WHEEL_CACHE=${HPCTRAIN_WHEEL_CACHE:-$HOME/.cache/hpctrain/wheels}
HOROVOD_VERSION=$(sed -n 's/^horovod==\([^ ]*\).*/\1/p' "$LOCK")

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

# A lock block is "name==version \" plus indented hash/comment lines; drop the named packages' blocks.
lock_without() { awk -v drop="$1" '/^[^ #]/ { split($1, a, "=="); skip = (a[1] ~ "^(" drop ")$") } !skip' "$LOCK"; }

if [ "$DEPS" = latest ]; then
  say "newest releases of requirements/base.in (not the lock: make test-latest)"
  stamp=""
  grep -vE '^(horovod)==' "$ROOT/requirements/base.in" > "$VENV/.base-latest.in"
  "${PIP[@]}" --upgrade -r "$VENV/.base-latest.in"
else
  say "pinned Python dependencies (requirements/lock.txt)"
  stamp="$(sha256sum "$LOCK" | cut -d' ' -f1) ${HPCTRAIN_TORCH:-}"
  if [ "$(cat "$VENV/.hpctrain-lock" 2>/dev/null)" != "$stamp" ]; then
    drop=horovod  # built below against the installed torch
    if [ -n "${HPCTRAIN_TORCH:-}" ]; then  # the site's torch (e.g. a CUDA build of the pinned version)
      "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$HPCTRAIN_TORCH"
      drop="horovod|torch"
    fi
    lock_without "$drop" > "$VENV/.lock-install.txt"
    "${PIP[@]}" --require-hashes --no-deps -r "$VENV/.lock-install.txt"
  fi
fi

say "hpctrain package (editable)"
(cd / && "$PY" -c "import hpctrain") 2>/dev/null || "${PIP[@]}" --no-build-isolation --no-deps -e .

say "Horovod $HOROVOD_VERSION (MPI + Gloo + PyTorch)"
if [ "$("$PY" -c "import horovod.torch, horovod; print(horovod.__version__)" 2>/dev/null)" != "$HOROVOD_VERSION" ]; then
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
      "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir --require-hashes -w "$cache" \
        -r <(awk '/^[^ #]/ { skip = ($1 !~ /^horovod==/) } !skip' "$LOCK")
  fi
  "${PIP[@]}" --no-deps "$cache"/horovod-$HOROVOD_VERSION-*.whl
fi

say "verifying Horovod (horovodrun --check-build)"
out=$(PATH="$VENV/bin:$PATH" "$VENV/bin/horovodrun" --check-build)
echo "$out" | grep -q "\[X\] PyTorch" || { echo "$out"; false; }
echo "$out" | grep -q "\[X\] MPI" || { echo "$out"; false; }
[ -z "$stamp" ] || echo "$stamp" > "$VENV/.hpctrain-lock"
echo "== install: done ($VENV)"
