#!/usr/bin/env bash
# Re-resolve requirements/base.in to exact versions with hashes in requirements/lock.txt (pip-tools,
# in a venv of its own so the tool's dependencies never enter the project's). After it: `make test`
# (the whole suite) with the new pins, then commit base.in + lock.txt together.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${HPCTRAIN_LOCK_VENV:-.venv-lock}
[ -x "$TOOLS/bin/pip-compile" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q pip-tools==7.6.2; }
cd requirements
# --allow-unsafe: setuptools and wheel are pinned too (Horovod builds with --no-build-isolation).
# HPCTRAIN_LOCK_KEEP=1: keep every existing pin, only resolve what base.in added (a new dependency).
upgrade=--upgrade
[ "${HPCTRAIN_LOCK_KEEP:-0}" = 1 ] && upgrade=
"../$TOOLS/bin/pip-compile" --quiet $upgrade --generate-hashes --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links -o lock.txt base.in
echo "lock.sh: requirements/lock.txt re-resolved; now run 'make test' before committing it"
