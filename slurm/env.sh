# shellcheck shell=bash
# Sourced by the batch templates inside the job (needs HPCTRAIN_ROOT). Loads the site profile
# slurm/sites/${HPCTRAIN_SITE:-default}.sh, then provides:
#   HPCTRAIN_SRUN_ARGS   srun options: MPI plugin, --kill-on-bad-exit, in GPU mode one rank per GPU plus the
#                        GPU request, and with spare nodes the step's node and task counts
#   HPCTRAIN_STEP_TASKS  ranks of the training step (world size; empty outside a job)
#   HPCTRAIN_EXEC        `apptainer exec [--nv] IMAGE` or `ch-run IMAGE --` (HPCTRAIN_CONTAINER_RUNTIME) when an
#                        image is set, then the python command
#                        (inside an image: the image's, `python3` unless the site file says otherwise)
#   hpctrain_step        the training step (`hpctrain_step -m hpctrain.resnet "$@"`), the script's LAST command:
#                        the batch shell becomes (exec) the supervisor `python -m hpctrain.slurm supervise`
#                        (hpctrain/slurm/supervise.py), which runs srun, forwards the job's signals, requeues
#                        on an agreed stop and relaunches a failed step in the allocation (docs/slurm.md)
#   hpctrain_supervise   wait for an srun step started in the background, forwarding USR1/TERM to it, then let
#                        the supervisor requeue the job if the step stopped on a signal with a checkpoint saved
# and exports HPCTRAIN_NET_IFACE (the interface for training traffic) with Open MPI's btl/oob_tcp_if_include.
# Every variable can be set in the environment of sbatch; the site file only supplies defaults. The
# supervisor runs on the host's HPCTRAIN_HOST_PYTHON (python3, 3.11 or newer, of the batch shell: outside
# any image). No exit code of hpctrain is spelt out here: the supervisor takes them from hpctrain/errors.py.
# HPCTRAIN_DRY_RUN=1: hpctrain_step prints the srun command line it would run and returns 0 (checks a site
# file or an image setting without a cluster: `HPCTRAIN_DRY_RUN=1 bash slurm/resnet_8node.sh ...`).

hpctrain_error() { echo "hpctrain: error: $*" >&2; return 2; }

HPCTRAIN_SITE=${HPCTRAIN_SITE:-default}
[[ $HPCTRAIN_SITE =~ ^[A-Za-z0-9_.-]+$ ]] \
  || { hpctrain_error "HPCTRAIN_SITE='$HPCTRAIN_SITE' is not a site name (allowed: letters, digits, _ . -)"; return 2; }
[ -f "$HPCTRAIN_ROOT/slurm/sites/$HPCTRAIN_SITE.sh" ] \
  || { hpctrain_error "HPCTRAIN_SITE=$HPCTRAIN_SITE: no file slurm/sites/$HPCTRAIN_SITE.sh (allowed: $(cd "$HPCTRAIN_ROOT/slurm/sites" && for f in *.sh; do printf '%s ' "${f%.sh}"; done))"; return 2; }
# shellcheck source=slurm/sites/default.sh
source "$HPCTRAIN_ROOT/slurm/sites/$HPCTRAIN_SITE.sh"
echo "hpctrain: job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NUM_NODES:-?} node(s), site $HPCTRAIN_SITE"

# Whatever the site file left unset.
HPCTRAIN_GPUS_PER_NODE=${HPCTRAIN_GPUS_PER_NODE:-0}
HPCTRAIN_MODULES=${HPCTRAIN_MODULES:-}
HPCTRAIN_IMAGE=${HPCTRAIN_IMAGE:-}
HPCTRAIN_CONTAINER_RUNTIME=${HPCTRAIN_CONTAINER_RUNTIME:-apptainer}
HPCTRAIN_APPTAINER=${HPCTRAIN_APPTAINER:-apptainer}
HPCTRAIN_APPTAINER_ARGS=${HPCTRAIN_APPTAINER_ARGS:-}
HPCTRAIN_CH_RUN=${HPCTRAIN_CH_RUN:-ch-run}
HPCTRAIN_CH_RUN_ARGS=${HPCTRAIN_CH_RUN_ARGS:-}
HPCTRAIN_SRUN_MPI=${HPCTRAIN_SRUN_MPI:-pmix}
HPCTRAIN_SRUN_EXTRA=${HPCTRAIN_SRUN_EXTRA:-}
HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-python3}
HPCTRAIN_HOST_PYTHON=${HPCTRAIN_HOST_PYTHON:-python3}
HPCTRAIN_SPARE_NODES=${HPCTRAIN_SPARE_NODES:-0}
HPCTRAIN_DRY_RUN=${HPCTRAIN_DRY_RUN:-0}
HPCTRAIN_NET_IFACE=${HPCTRAIN_NET_IFACE:-}

# Checked before any of them is used as a number (bash arithmetic would run $(...) in a value).
hpctrain_whole() {  # VARIABLE [NOTE]: fails unless the variable holds a whole number
  [[ ${!1} =~ ^[0-9]+$ ]] || hpctrain_error "$1='${!1}' is not a whole number (allowed: 0, 1, 2, ...${2:+; $2})"
}
hpctrain_whole HPCTRAIN_GPUS_PER_NODE "0 = CPU mode" || return 2
# The supervisor's limits (unset or empty: its defaults, 20 requeues and 2 restarts), checked before anything runs.
[ -z "${HPCTRAIN_MAX_REQUEUES:-}" ] || hpctrain_whole HPCTRAIN_MAX_REQUEUES || return 2
[ -z "${HPCTRAIN_MAX_RESTARTS:-}" ] || hpctrain_whole HPCTRAIN_MAX_RESTARTS || return 2
[ -z "${HPCTRAIN_STEP_END_WAIT:-}" ] || hpctrain_whole HPCTRAIN_STEP_END_WAIT || return 2
hpctrain_whole HPCTRAIN_SPARE_NODES || return 2
[[ $HPCTRAIN_DRY_RUN =~ ^[01]$ ]] \
  || { hpctrain_error "HPCTRAIN_DRY_RUN='$HPCTRAIN_DRY_RUN' is not allowed (allowed: 0, 1)"; return 2; }
[[ ${SLURM_JOB_NUM_NODES:-1} =~ ^[1-9][0-9]*$ ]] \
  || { hpctrain_error "SLURM_JOB_NUM_NODES='$SLURM_JOB_NUM_NODES' is not a node count"; return 2; }

# The interface for training traffic (docs/slurm.md "Network interfaces"): each rank sets every library's own
# variable from it; Open MPI's are exported here too, for srun's and mpirun's ranks and mpirun's daemons. An
# OMPI_MCA_* already in the environment wins.
if [ -n "$HPCTRAIN_NET_IFACE" ]; then
  [[ $HPCTRAIN_NET_IFACE =~ ^[A-Za-z0-9_.@:-]+(,[A-Za-z0-9_.@:-]+)*$ ]] \
    || { hpctrain_error "HPCTRAIN_NET_IFACE='$HPCTRAIN_NET_IFACE' is not an interface name (allowed: a name like ib0, or a comma list)"; return 2; }
  export HPCTRAIN_NET_IFACE
  export OMPI_MCA_btl_tcp_if_include=${OMPI_MCA_btl_tcp_if_include:-$HPCTRAIN_NET_IFACE}
  export OMPI_MCA_oob_tcp_if_include=${OMPI_MCA_oob_tcp_if_include:-$HPCTRAIN_NET_IFACE}
fi

if [ -n "$HPCTRAIN_MODULES" ]; then
  type module >/dev/null 2>&1 \
    || { hpctrain_error "HPCTRAIN_MODULES='$HPCTRAIN_MODULES' set but no 'module' command in the batch shell"; return 2; }
  # shellcheck disable=SC2086  # a space-separated list of modules
  module load $HPCTRAIN_MODULES || { hpctrain_error "module load $HPCTRAIN_MODULES failed"; return 2; }
fi

# --kill-on-bad-exit: a rank that dies (kill -9, segfault, a lost node's processes) makes srun end the
# whole step at once, instead of the other ranks waiting in a collective until the time limit. srun's
# status then is that of the worst task, often a rank it terminated itself (143), not the dead one's:
# the supervisor reads srun's per-task lines to find out what happened (hpctrain/slurm/outcome.py).
HPCTRAIN_SRUN_ARGS=(--mpi="$HPCTRAIN_SRUN_MPI" --kill-on-bad-exit=1)
# Spare nodes stay idle until a restart needs one in place of a node that was blamed for a failure.
HPCTRAIN_STEP_NODES=$(( ${SLURM_JOB_NUM_NODES:-1} - HPCTRAIN_SPARE_NODES ))
if [ "$HPCTRAIN_STEP_NODES" -lt 1 ]; then
  hpctrain_error "HPCTRAIN_SPARE_NODES=$HPCTRAIN_SPARE_NODES leaves no node for training (the job has ${SLURM_JOB_NUM_NODES:-1} node(s))"
  return 2
fi
HPCTRAIN_NV=()
if [ "$HPCTRAIN_GPUS_PER_NODE" -gt 0 ]; then
  # One rank per GPU. GPUs that an --exclusive job holds implicitly must still be requested by the step.
  HPCTRAIN_STEP_TASKS=$(( HPCTRAIN_STEP_NODES * HPCTRAIN_GPUS_PER_NODE ))
  HPCTRAIN_SRUN_ARGS+=(--ntasks-per-node="$HPCTRAIN_GPUS_PER_NODE" --ntasks="$HPCTRAIN_STEP_TASKS"
                       --gpus-per-node="$HPCTRAIN_GPUS_PER_NODE")
  HPCTRAIN_NV=(--nv)
elif [ "$HPCTRAIN_SPARE_NODES" -gt 0 ]; then
  # CPU mode: the header's tasks per node, on fewer nodes than the job has, so srun needs the counts.
  _hpctrain_per_node=${SLURM_NTASKS_PER_NODE:-}
  if [ -z "$_hpctrain_per_node" ] && [[ ${SLURM_NTASKS:-} =~ ^[1-9][0-9]*$ ]] \
     && (( SLURM_NTASKS % ${SLURM_JOB_NUM_NODES:-1} == 0 )); then
    _hpctrain_per_node=$(( SLURM_NTASKS / ${SLURM_JOB_NUM_NODES:-1} ))
  fi
  [[ $_hpctrain_per_node =~ ^[1-9][0-9]*$ ]] \
    || { hpctrain_error "HPCTRAIN_SPARE_NODES=$HPCTRAIN_SPARE_NODES needs the same number of tasks on every node (sbatch --ntasks-per-node)"; return 2; }
  HPCTRAIN_STEP_TASKS=$(( HPCTRAIN_STEP_NODES * _hpctrain_per_node ))
  HPCTRAIN_SRUN_ARGS+=(--ntasks-per-node="$_hpctrain_per_node" --ntasks="$HPCTRAIN_STEP_TASKS")
  unset _hpctrain_per_node
else
  # CPU mode on every node of the job: srun takes the header's layout (--ntasks-per-node).
  HPCTRAIN_STEP_TASKS=${SLURM_NTASKS:-}
fi
if [ "$HPCTRAIN_SPARE_NODES" -gt 0 ]; then
  HPCTRAIN_SRUN_ARGS+=(--nodes="$HPCTRAIN_STEP_NODES")
fi
# shellcheck disable=SC2206  # extra srun options are a space-separated list on purpose
HPCTRAIN_SRUN_ARGS+=($HPCTRAIN_SRUN_EXTRA)

# The container line: one site setting picks the runtime (each rank in its own container, the hybrid MPI model).
#   apptainer     apptainer exec [--nv] HPCTRAIN_APPTAINER_ARGS IMAGE python...   (a .sif or a sandbox directory)
#   charliecloud  ch-run HPCTRAIN_CH_RUN_ARGS IMAGE -- python...     (a directory or SquashFS image; binds and the
#                 working directory via -b/-c in HPCTRAIN_CH_RUN_ARGS; GPUs: the image needs the host's driver
#                 libraries injected with ch-fromhost beforehand, there is no --nv)
# Extra options are split on blanks only (read -a: no globbing of e.g. `--bind /data/*`).
HPCTRAIN_EXEC=()
if [ -n "$HPCTRAIN_IMAGE" ]; then
  case $HPCTRAIN_CONTAINER_RUNTIME in
    apptainer)
      read -r -a _hpctrain_args <<< "$HPCTRAIN_APPTAINER_ARGS"
      HPCTRAIN_EXEC=("$HPCTRAIN_APPTAINER" exec "${HPCTRAIN_NV[@]}" "${_hpctrain_args[@]}" "$HPCTRAIN_IMAGE") ;;
    charliecloud)
      read -r -a _hpctrain_args <<< "$HPCTRAIN_CH_RUN_ARGS"
      export USER=${USER:-$(id -un)}  # ch-run refuses to start without it
      HPCTRAIN_EXEC=("$HPCTRAIN_CH_RUN" "${_hpctrain_args[@]}" "$HPCTRAIN_IMAGE" --) ;;
    *)
      hpctrain_error "HPCTRAIN_CONTAINER_RUNTIME='$HPCTRAIN_CONTAINER_RUNTIME' is not allowed (allowed: apptainer, charliecloud)"
      return 2 ;;
  esac
  unset _hpctrain_args
fi
HPCTRAIN_EXEC+=("$HPCTRAIN_PYTHON")

# Signals: Slurm's --signal=B:USR1@lead reaches only this batch shell, scancel's SIGTERM reaches it too.
# Until the supervisor takes over (hpctrain_step), and while a step of your own runs (hpctrain_supervise),
# record the signal and pass it to the job step as SIGUSR1: srun forwards SIGUSR1 to every task but ends
# the step on SIGTERM, and the ranks treat both alike.
HPCTRAIN_STEP_PID=
HPCTRAIN_SIGNAL=
hpctrain_forward() {
  HPCTRAIN_SIGNAL=$1
  echo "hpctrain: batch script got SIG$1 at $(date +%T)${HPCTRAIN_STEP_PID:+, forwarding it to the job step as SIGUSR1}"
  [ -n "$HPCTRAIN_STEP_PID" ] && kill -s USR1 "$HPCTRAIN_STEP_PID" 2>/dev/null
  return 0
}
trap 'hpctrain_forward USR1' USR1
trap 'hpctrain_forward TERM' TERM

hpctrain_wait() {  # PID: wait until it has ended, return its status
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again until it is gone.
  while kill -0 "$1" 2>/dev/null; do wait "$1"; done
  wait "$1"
}

hpctrain_supervisor() {  # [exec] ARGS...: `python -m hpctrain.slurm supervise ARGS` on the host's python
  local replace=0
  if [ "${1:-}" = exec ]; then replace=1; shift; fi
  command -v "$HPCTRAIN_HOST_PYTHON" >/dev/null 2>&1 \
    || { hpctrain_error "HPCTRAIN_HOST_PYTHON='$HPCTRAIN_HOST_PYTHON' not found (allowed: a python3.11 or newer on the batch shell's PATH, or its path)"; return 2; }
  # The repository first on PYTHONPATH for the supervisor only: it takes it off again for srun and the ranks.
  local run=(env "HPCTRAIN_SUPERVISOR_PYTHONPATH=$HPCTRAIN_ROOT" "PYTHONPATH=$HPCTRAIN_ROOT${PYTHONPATH:+:$PYTHONPATH}"
             "$HPCTRAIN_HOST_PYTHON" -m hpctrain.slurm supervise "$@")
  # USR1 and TERM ignored until the supervisor's own handlers (its first action): a new process would start
  # with a trapped signal reset to its default action, and die of a late SIGTERM of the job (scancel) or
  # of the lead USR1 while Python starts. An ignored signal stays ignored.
  if [ "$replace" = 1 ]; then
    trap '' USR1 TERM
    exec "${run[@]}"
  fi
  ( trap '' USR1 TERM; exec "${run[@]}" )
}

# For a batch script of your own: `srun ... & hpctrain_supervise $!` (signals forwarded, requeue on an agreed
# stop; no relaunch in the allocation). The templates use hpctrain_step.
hpctrain_supervise() {  # PID of the srun started in the background; returns the step's status (0 once requeued)
  HPCTRAIN_STEP_PID=$1
  [ -n "$HPCTRAIN_SIGNAL" ] && kill -s USR1 "$HPCTRAIN_STEP_PID" 2>/dev/null
  hpctrain_wait "$HPCTRAIN_STEP_PID"
  local rc=$?
  HPCTRAIN_STEP_PID=
  [ "$rc" -eq 0 ] && return 0
  hpctrain_supervisor --status "$rc"
}

# The training step, e.g. `hpctrain_step -m hpctrain.resnet "$@"` (what follows the interpreter), as the LAST
# command of the batch script: the batch shell becomes the supervisor (exec), so the job's signals reach it
# and its exit code is the job's. It runs srun, requeues on an agreed stop and relaunches a failed step in
# the allocation, deciding from srun's per-task lines, the run's status (run_dir/run.json) and the ranks'
# hang records: hpctrain/slurm/supervise.py, docs/slurm.md.
hpctrain_step() {
  if [ "$HPCTRAIN_DRY_RUN" = 1 ]; then
    echo "hpctrain: dry run: $(printf '%q ' srun "${HPCTRAIN_SRUN_ARGS[@]}" "${HPCTRAIN_EXEC[@]}" "$@")"
    return 0
  fi
  local args=() a
  for a in "${HPCTRAIN_SRUN_ARGS[@]}"; do args+=("--srun-arg=$a"); done
  [ -n "$HPCTRAIN_SIGNAL" ] && args+=("--signal=$HPCTRAIN_SIGNAL")  # came before: the supervisor passes it on
  hpctrain_supervisor exec "${args[@]}" -- "${HPCTRAIN_EXEC[@]}" "$@"
}
