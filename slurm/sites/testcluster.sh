# shellcheck shell=bash
# The emulated cluster of tests/slurm_cluster: CPU only (fake GPUs via GRES do not work there), no
# modules, no container by default, the repository's own virtual environment. With HPCTRAIN_IMAGE set: the
# image's python3 (its %environment puts the image's venv first on PATH); the repository's venv is bound into
# the container with the working directory and would run host packages on the image's system libraries.
HPCTRAIN_ACCOUNT=${HPCTRAIN_ACCOUNT:-}
HPCTRAIN_PARTITION=${HPCTRAIN_PARTITION:-}
HPCTRAIN_MODULES=${HPCTRAIN_MODULES:-}
HPCTRAIN_GPUS_PER_NODE=${HPCTRAIN_GPUS_PER_NODE:-0}
HPCTRAIN_IMAGE=${HPCTRAIN_IMAGE:-}
HPCTRAIN_SRUN_MPI=${HPCTRAIN_SRUN_MPI:-pmix}
if [ -n "$HPCTRAIN_IMAGE" ] && [ "${HPCTRAIN_CONTAINER_RUNTIME:-apptainer}" = charliecloud ]; then
  # ch-run applies no image environment: the image's venv by its path; /tmp (where the tests' run dirs live) bound
  # in, the image's own copy of the code (configs/) as the working directory.
  HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-/opt/venv/bin/python}
  HPCTRAIN_CH_RUN_ARGS=${HPCTRAIN_CH_RUN_ARGS:--b /tmp -c /opt/hpctrain}
elif [ -n "$HPCTRAIN_IMAGE" ]; then
  HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-python3}
else
  HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-$HPCTRAIN_ROOT/.venv/bin/python}
fi
# All emulated nodes share this host's cores: one thread per rank instead of every core per rank.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
