# shellcheck shell=bash
# Example of a real GPU site: 4 GPUs per node, software from environment modules, training inside an
# Apptainer image. Adapt the names to your centre; everything can still be overridden from the
# environment (e.g. HPCTRAIN_IMAGE=/scratch/me/hpctrain.sif sbatch slurm/resnet_8node.sh).
HPCTRAIN_ACCOUNT=${HPCTRAIN_ACCOUNT:-myproject}
HPCTRAIN_PARTITION=${HPCTRAIN_PARTITION:-gpu}
HPCTRAIN_MODULES=${HPCTRAIN_MODULES:-apptainer}
HPCTRAIN_GPUS_PER_NODE=${HPCTRAIN_GPUS_PER_NODE:-4}
HPCTRAIN_IMAGE=${HPCTRAIN_IMAGE:-${HPCTRAIN_IMAGE_DIR:-$HOME/images}/hpctrain.sif}
HPCTRAIN_APPTAINER_ARGS=${HPCTRAIN_APPTAINER_ARGS:---bind ${SCRATCH:-/tmp}}
HPCTRAIN_SRUN_MPI=${HPCTRAIN_SRUN_MPI:-pmix}
HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-python3}         # the image's interpreter
HPCTRAIN_MAX_RESTARTS=${HPCTRAIN_MAX_RESTARTS:-2}
HPCTRAIN_SPARE_NODES=${HPCTRAIN_SPARE_NODES:-0}          # e.g. 1 with sbatch --nodes=9 for 8 training nodes
HPCTRAIN_NET_IFACE=${HPCTRAIN_NET_IFACE:-}               # e.g. ib0: training traffic on the fabric, not the management Ethernet
