# Sourced by the batch templates inside the job (needs HPCTRAIN_ROOT). Loads the site profile
# slurm/sites/${HPCTRAIN_SITE:-default}.sh, then provides:
#   HPCTRAIN_SRUN_ARGS   srun options: MPI plugin, and in GPU mode one rank per GPU plus the GPU request
#   HPCTRAIN_EXEC        `apptainer exec [--nv] IMAGE` when an image is set, then the python command
#   hpctrain_supervise   wait for the srun step in the background, forwarding USR1/TERM to it, and
#                        requeue the job when the step exits with 85 (checkpoint saved on a signal)
# Every variable can be set in the environment of sbatch; the site file only supplies defaults.

# Must equal hpctrain.preempt.EXIT_PREEMPTED (tests/unit/test_slurm_helper.py checks).
HPCTRAIN_EXIT_PREEMPTED=85

hpctrain_error() { echo "hpctrain: error: $*" >&2; return 2; }

HPCTRAIN_SITE=${HPCTRAIN_SITE:-default}
[[ $HPCTRAIN_SITE =~ ^[A-Za-z0-9_.-]+$ ]] \
  || { hpctrain_error "HPCTRAIN_SITE='$HPCTRAIN_SITE' is not a site name (allowed: letters, digits, _ . -)"; return 2; }
[ -f "$HPCTRAIN_ROOT/slurm/sites/$HPCTRAIN_SITE.sh" ] \
  || { hpctrain_error "HPCTRAIN_SITE=$HPCTRAIN_SITE: no file slurm/sites/$HPCTRAIN_SITE.sh (allowed: $(cd "$HPCTRAIN_ROOT/slurm/sites" && ls *.sh | sed 's/\.sh$//' | tr '\n' ' '))"; return 2; }
source "$HPCTRAIN_ROOT/slurm/sites/$HPCTRAIN_SITE.sh"
echo "hpctrain: job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NUM_NODES:-?} node(s), site $HPCTRAIN_SITE"

# Whatever the site file left unset.
HPCTRAIN_GPUS_PER_NODE=${HPCTRAIN_GPUS_PER_NODE:-0}
HPCTRAIN_MODULES=${HPCTRAIN_MODULES:-}
HPCTRAIN_IMAGE=${HPCTRAIN_IMAGE:-}
HPCTRAIN_APPTAINER=${HPCTRAIN_APPTAINER:-apptainer}
HPCTRAIN_APPTAINER_ARGS=${HPCTRAIN_APPTAINER_ARGS:-}
HPCTRAIN_SRUN_MPI=${HPCTRAIN_SRUN_MPI:-pmix}
HPCTRAIN_SRUN_EXTRA=${HPCTRAIN_SRUN_EXTRA:-}
HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-python3}
HPCTRAIN_MAX_REQUEUES=${HPCTRAIN_MAX_REQUEUES:-20}

[[ $HPCTRAIN_GPUS_PER_NODE =~ ^[0-9]+$ ]] \
  || { hpctrain_error "HPCTRAIN_GPUS_PER_NODE='$HPCTRAIN_GPUS_PER_NODE' is not a whole number (0 = CPU mode)"; return 2; }
[[ $HPCTRAIN_MAX_REQUEUES =~ ^[0-9]+$ ]] \
  || { hpctrain_error "HPCTRAIN_MAX_REQUEUES='$HPCTRAIN_MAX_REQUEUES' is not a whole number"; return 2; }

if [ -n "$HPCTRAIN_MODULES" ]; then
  type module >/dev/null 2>&1 \
    || { hpctrain_error "HPCTRAIN_MODULES='$HPCTRAIN_MODULES' set but no 'module' command in the batch shell"; return 2; }
  # shellcheck disable=SC2086  # a space-separated list of modules
  module load $HPCTRAIN_MODULES || { hpctrain_error "module load $HPCTRAIN_MODULES failed"; return 2; }
fi

HPCTRAIN_SRUN_ARGS=(--mpi="$HPCTRAIN_SRUN_MPI")
HPCTRAIN_NV=()
if [ "$HPCTRAIN_GPUS_PER_NODE" -gt 0 ]; then
  # One rank per GPU. GPUs that an --exclusive job holds implicitly must still be requested by the step.
  HPCTRAIN_SRUN_ARGS+=(--ntasks-per-node="$HPCTRAIN_GPUS_PER_NODE"
                       --ntasks="$(( ${SLURM_JOB_NUM_NODES:-1} * HPCTRAIN_GPUS_PER_NODE ))"
                       --gpus-per-node="$HPCTRAIN_GPUS_PER_NODE")
  HPCTRAIN_NV=(--nv)
fi
# shellcheck disable=SC2206  # extra srun options are a space-separated list on purpose
HPCTRAIN_SRUN_ARGS+=($HPCTRAIN_SRUN_EXTRA)

HPCTRAIN_EXEC=()
if [ -n "$HPCTRAIN_IMAGE" ]; then
  # shellcheck disable=SC2206
  HPCTRAIN_EXEC=("$HPCTRAIN_APPTAINER" exec "${HPCTRAIN_NV[@]}" $HPCTRAIN_APPTAINER_ARGS "$HPCTRAIN_IMAGE")
fi
HPCTRAIN_EXEC+=("$HPCTRAIN_PYTHON")

# Signals: Slurm's --signal=B:USR1@lead reaches only this batch shell, scancel's SIGTERM reaches it
# too. Record the signal now and pass it to the job step once it runs, always as SIGUSR1: srun
# forwards SIGUSR1 to every task but ends the step on SIGTERM, and the ranks treat both alike.
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

hpctrain_supervise() {  # PID of the srun started in the background
  HPCTRAIN_STEP_PID=$1
  [ -n "$HPCTRAIN_SIGNAL" ] && kill -s USR1 "$HPCTRAIN_STEP_PID" 2>/dev/null
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again until the step is gone.
  while kill -0 "$HPCTRAIN_STEP_PID" 2>/dev/null; do wait "$HPCTRAIN_STEP_PID"; done
  wait "$HPCTRAIN_STEP_PID"
  local rc=$?
  if [ "$rc" -ne "$HPCTRAIN_EXIT_PREEMPTED" ]; then
    return "$rc"
  fi
  local job=${SLURM_JOB_ID:-}
  [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  # A plain scancel, the time limit or a preemption also send SIGTERM, but then Slurm is already
  # ending the job (COMPLETING): requeueing would make scancel unable to stop it.
  local state
  state=$(scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1)
  if [ "$state" != "JobState=RUNNING" ]; then
    echo "hpctrain: step stopped on a signal with a checkpoint saved (exit $rc); Slurm is ending job $job (${state:-state unknown}): not requeueing, resubmit to resume"
    return "$rc"
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$HPCTRAIN_MAX_REQUEUES" ]; then
    echo "hpctrain: step stopped on a signal (exit $rc) but job $job was already requeued ${SLURM_RESTART_COUNT} time(s) (HPCTRAIN_MAX_REQUEUES=$HPCTRAIN_MAX_REQUEUES): not requeueing"
    return "$rc"
  fi
  echo "hpctrain: step stopped on a signal with a checkpoint saved (exit $rc): requeueing job $job at $(date +%T)"
  scontrol requeue "$job" || { hpctrain_error "scontrol requeue $job failed: resubmit to resume"; return "$rc"; }
  return 0
}
