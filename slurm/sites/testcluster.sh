# shellcheck shell=bash
# The emulated cluster of tests/slurm_cluster: CPU only (fake GPUs via GRES do not work there), no
# modules, no container, the repository's own virtual environment.
HPCTRAIN_ACCOUNT=${HPCTRAIN_ACCOUNT:-}
HPCTRAIN_PARTITION=${HPCTRAIN_PARTITION:-}
HPCTRAIN_MODULES=${HPCTRAIN_MODULES:-}
HPCTRAIN_GPUS_PER_NODE=${HPCTRAIN_GPUS_PER_NODE:-0}
HPCTRAIN_IMAGE=${HPCTRAIN_IMAGE:-}
HPCTRAIN_SRUN_MPI=${HPCTRAIN_SRUN_MPI:-pmix}
HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-$HPCTRAIN_ROOT/.venv/bin/python}
# All emulated nodes share this host's cores: one thread per rank instead of every core per rank.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
