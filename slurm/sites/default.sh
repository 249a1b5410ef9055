# shellcheck shell=bash
# Generic site: no account or partition request, no modules, CPU mode (no GPU request), no container,
# Open MPI/PMIx via `srun --mpi=pmix`, python3 from PATH. Copy this file to slurm/sites/<yours>.sh
# and select it with HPCTRAIN_SITE=<yours>. Values already in the environment win.
HPCTRAIN_ACCOUNT=${HPCTRAIN_ACCOUNT:-}              # sbatch --account (used by python -m hpctrain.slurm)
HPCTRAIN_PARTITION=${HPCTRAIN_PARTITION:-}          # sbatch --partition (idem)
HPCTRAIN_MODULES=${HPCTRAIN_MODULES:-}              # space-separated, passed to `module load`
HPCTRAIN_GPUS_PER_NODE=${HPCTRAIN_GPUS_PER_NODE:-0} # 0 = CPU mode: no GPU request, no --nv
HPCTRAIN_IMAGE=${HPCTRAIN_IMAGE:-}                  # the image (.sif, or a directory); empty = run on the host
HPCTRAIN_CONTAINER_RUNTIME=${HPCTRAIN_CONTAINER_RUNTIME:-apptainer}  # apptainer or charliecloud (ch-run)
HPCTRAIN_CH_RUN_ARGS=${HPCTRAIN_CH_RUN_ARGS:-}      # ch-run's binds and working directory, e.g. "-b /scratch -c /opt/hpctrain"
HPCTRAIN_SRUN_MPI=${HPCTRAIN_SRUN_MPI:-pmix}        # srun --mpi plugin matching the MPI Horovod uses
HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-python3}         # interpreter with hpctrain's dependencies
HPCTRAIN_MAX_RESTARTS=${HPCTRAIN_MAX_RESTARTS:-2}   # relaunches of a failed step in the same allocation
HPCTRAIN_SPARE_NODES=${HPCTRAIN_SPARE_NODES:-0}     # idle nodes of the job that replace blamed ones on a relaunch
HPCTRAIN_NET_IFACE=${HPCTRAIN_NET_IFACE:-}          # interface(s) for training traffic, e.g. ib0 or eth2 (empty: each library picks)
