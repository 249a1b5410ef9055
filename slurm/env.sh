# shellcheck shell=bash
# Sourced by the batch templates inside the job (needs HPCTRAIN_ROOT). Loads the site profile
# slurm/sites/${HPCTRAIN_SITE:-default}.sh, then provides:
#   HPCTRAIN_SRUN_ARGS   srun options: MPI plugin, --kill-on-bad-exit, in GPU mode one rank per GPU plus the
#                        GPU request, and with spare nodes the step's node and task counts
#   HPCTRAIN_STEP_TASKS  ranks of the training step (world size; empty outside a job)
#   HPCTRAIN_EXEC        `apptainer exec [--nv] IMAGE` when an image is set, then the python command
#                        (inside an image: the image's, `python3` unless the site file says otherwise)
#   hpctrain_step        run the training step (`hpctrain_step -m hpctrain.resnet "$@"`): srun in the
#                        background, signals forwarded, requeue on exit 85, relaunch in the same
#                        allocation when a rank died (see docs/slurm.md, "In-job restart and dead ranks")
#   hpctrain_supervise   wait for an srun step started in the background, forwarding USR1/TERM to it, and
#                        requeue the job when the step exits with 85 (checkpoint saved on a signal)
# Every variable can be set in the environment of sbatch; the site file only supplies defaults.
# HPCTRAIN_DRY_RUN=1: hpctrain_step prints the srun command line it would run and returns 0 (checks a site
# file or an image setting without a cluster: `HPCTRAIN_DRY_RUN=1 bash slurm/resnet_8node.sh ...`).

# Must equal hpctrain.errors.EXIT_PREEMPTED (tests/unit/test_slurm_helper.py checks).
HPCTRAIN_EXIT_PREEMPTED=85
# Exit codes of hpctrain (hpctrain/errors.py) after which relaunching the step would fail the same way:
# bad input, a checkpoint that could not be saved, a non-finite loss.
HPCTRAIN_EXIT_NO_RESTART="2 87 88"
HPCTRAIN_EXIT_HANG=86  # the hang watchdog of the ranks that were still alive fired

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
HPCTRAIN_APPTAINER=${HPCTRAIN_APPTAINER:-apptainer}
HPCTRAIN_APPTAINER_ARGS=${HPCTRAIN_APPTAINER_ARGS:-}
HPCTRAIN_SRUN_MPI=${HPCTRAIN_SRUN_MPI:-pmix}
HPCTRAIN_SRUN_EXTRA=${HPCTRAIN_SRUN_EXTRA:-}
HPCTRAIN_PYTHON=${HPCTRAIN_PYTHON:-python3}
HPCTRAIN_MAX_REQUEUES=${HPCTRAIN_MAX_REQUEUES:-20}
HPCTRAIN_MAX_RESTARTS=${HPCTRAIN_MAX_RESTARTS:-2}
HPCTRAIN_SPARE_NODES=${HPCTRAIN_SPARE_NODES:-0}
HPCTRAIN_DRY_RUN=${HPCTRAIN_DRY_RUN:-0}

# Checked before any of them is used as a number (bash arithmetic would run $(...) in a value).
hpctrain_whole() {  # VARIABLE [NOTE]: fails unless the variable holds a whole number
  [[ ${!1} =~ ^[0-9]+$ ]] || hpctrain_error "$1='${!1}' is not a whole number${2:-}"
}
hpctrain_whole HPCTRAIN_GPUS_PER_NODE " (0 = CPU mode)" || return 2
hpctrain_whole HPCTRAIN_MAX_REQUEUES || return 2
hpctrain_whole HPCTRAIN_MAX_RESTARTS || return 2
hpctrain_whole HPCTRAIN_SPARE_NODES || return 2
[[ $HPCTRAIN_DRY_RUN =~ ^[01]$ ]] \
  || { hpctrain_error "HPCTRAIN_DRY_RUN='$HPCTRAIN_DRY_RUN' is not allowed (allowed: 0, 1)"; return 2; }
[[ ${SLURM_JOB_NUM_NODES:-1} =~ ^[1-9][0-9]*$ ]] \
  || { hpctrain_error "SLURM_JOB_NUM_NODES='$SLURM_JOB_NUM_NODES' is not a node count"; return 2; }

if [ -n "$HPCTRAIN_MODULES" ]; then
  type module >/dev/null 2>&1 \
    || { hpctrain_error "HPCTRAIN_MODULES='$HPCTRAIN_MODULES' set but no 'module' command in the batch shell"; return 2; }
  # shellcheck disable=SC2086  # a space-separated list of modules
  module load $HPCTRAIN_MODULES || { hpctrain_error "module load $HPCTRAIN_MODULES failed"; return 2; }
fi

# --kill-on-bad-exit: a rank that dies (kill -9, segfault, a lost node's processes) makes srun end the
# whole step at once, instead of the other ranks waiting in a collective until the time limit. srun's
# status then is that of the worst task, often a rank it terminated itself (143), not the dead one's:
# hpctrain_step reads srun's per-task lines to find out what happened (hpctrain_step_outcome).
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

HPCTRAIN_EXEC=()
if [ -n "$HPCTRAIN_IMAGE" ]; then
  # Extra options are split on blanks only (read -a: no globbing of e.g. `--bind /data/*`).
  read -r -a _hpctrain_args <<< "$HPCTRAIN_APPTAINER_ARGS"
  HPCTRAIN_EXEC=("$HPCTRAIN_APPTAINER" exec "${HPCTRAIN_NV[@]}" "${_hpctrain_args[@]}" "$HPCTRAIN_IMAGE")
  unset _hpctrain_args
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

hpctrain_wait() {  # PID: wait until it has ended, return its status
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again until it is gone.
  while kill -0 "$1" 2>/dev/null; do wait "$1"; done
  wait "$1"
}

hpctrain_job() {  # the id scontrol knows this job by: <array job>_<task> in job arrays
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "${SLURM_JOB_ID:-}"
  fi
}

hpctrain_job_state() {  # e.g. JobState=RUNNING; empty when scontrol cannot tell
  scontrol show job "$(hpctrain_job)" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1
}

hpctrain_requeue() {  # RC (85): the step stopped on a signal with a checkpoint saved; returns the job's status
  local rc=$1 job state
  job=$(hpctrain_job)
  # A plain scancel, the time limit or a preemption also send SIGTERM, but then Slurm is already
  # ending the job (COMPLETING): requeueing would make scancel unable to stop it.
  state=$(hpctrain_job_state)
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

# For a batch script of your own: `srun ... & hpctrain_supervise $!`. The templates use hpctrain_step.
hpctrain_supervise() {  # PID of the srun started in the background
  HPCTRAIN_STEP_PID=$1
  [ -n "$HPCTRAIN_SIGNAL" ] && kill -s USR1 "$HPCTRAIN_STEP_PID" 2>/dev/null
  hpctrain_wait "$HPCTRAIN_STEP_PID"
  local rc=$?
  HPCTRAIN_STEP_PID=
  if [ "$rc" -ne "$HPCTRAIN_EXIT_PREEMPTED" ]; then
    return "$rc"
  fi
  hpctrain_requeue "$rc"
}

hpctrain_run_step() {  # LOG EXCLUDE ARGS...: one srun step, shown as usual and copied to LOG; srun's status
  local log=$1 exclude=$2 out err tee_out tee_err rc
  shift 2
  local where=()
  [ -n "$exclude" ] && where=(--exclude="$exclude")
  : >"$log"
  # The copies in LOG are read after the step (what failed, where, which steps were saved). The tee
  # processes ignore the job's signals: a plain scancel sends SIGTERM to every process of the batch
  # step, and srun would die of SIGPIPE before the ranks' last lines (the checkpoint saved) are through.
  exec {out}> >(trap '' TERM USR1 INT; exec tee -a "$log")
  tee_out=$!
  exec {err}> >(trap '' TERM USR1 INT; exec tee -a "$log" >&2)
  tee_err=$!
  srun "${HPCTRAIN_SRUN_ARGS[@]}" "${where[@]}" "${HPCTRAIN_EXEC[@]}" "$@" >&"$out" 2>&"$err" {out}>&- {err}>&- &
  HPCTRAIN_STEP_PID=$!
  [ -n "$HPCTRAIN_SIGNAL" ] && kill -s USR1 "$HPCTRAIN_STEP_PID" 2>/dev/null
  hpctrain_wait "$HPCTRAIN_STEP_PID"
  rc=$?
  HPCTRAIN_STEP_PID=
  # Only srun wrote to these pipes: once it is gone and ours are closed, the tee processes end, and
  # after them every line of the step is in LOG.
  exec {out}>&- {err}>&-
  hpctrain_wait "$tee_out"
  hpctrain_wait "$tee_err"
  return "$rc"
}

# srun reports each node's failed tasks in one line on its stderr, in the order it learnt of them, e.g.
#   srun: error: node3: task 2: Killed
#   srun: error: node1: tasks 0-1: Exited with exit code 85
#   srun: error: node1: task 0: Terminated          (a rank srun itself ended: --kill-on-bad-exit)
# The first line is the task that failed first: the others follow only once srun ends the step.
HPCTRAIN_TASK_LINE='^srun: error: ([^: ]+): tasks? [0-9,-]+: (.*)$'

hpctrain_step_outcome() {  # LOG RC: sets HPCTRAIN_CODE (what the step failed with) and HPCTRAIN_CAUSE (in words)
  local log=$1 rc=$2 first
  HPCTRAIN_CODE=$rc
  HPCTRAIN_CAUSE="no failed task reported by srun"
  first=$(grep -m 1 -E "$HPCTRAIN_TASK_LINE" "$log")
  [[ $first =~ $HPCTRAIN_TASK_LINE ]] || return 0
  HPCTRAIN_CAUSE=${first#srun: error: }  # e.g. "node3: task 2: Killed"
  # The first failed task's own exit code: srun's status may be that of a rank it terminated later. So
  # when every rank exits 85 after an agreed stop, the step counts as preempted even if srun ended rank 0
  # on the first rank's exit 85 (--kill-on-bad-exit) and itself returned 143.
  if [[ ${BASH_REMATCH[2]} =~ ^Exited\ with\ exit\ code\ ([0-9]+)$ ]]; then
    HPCTRAIN_CODE=${BASH_REMATCH[1]}
  fi
  if [ "$HPCTRAIN_CODE" = "$HPCTRAIN_EXIT_HANG" ]; then
    HPCTRAIN_CAUSE="hang watchdog: $HPCTRAIN_CAUSE"
  fi
  return 0
}

hpctrain_blame() {  # LOG CODE: prints the node(s) to blame for the failure, comma-separated; nothing if unsure
  local log=$1 code=$2 line node status
  if [ "$code" = "$HPCTRAIN_EXIT_HANG" ]; then
    # Every rank whose watchdog fired printed `rank R on node NODE: no progress for ...` and exited 86; a
    # frozen rank cannot print. So blame the step's nodes where no rank printed, when that is some but not
    # all of them. The step's nodes are those srun reports tasks of: every task of such a step ends non-zero.
    local step_nodes printed
    step_nodes=$(grep -E "$HPCTRAIN_TASK_LINE" "$log" | sed -E "s/$HPCTRAIN_TASK_LINE/\\1/" | sort -u)
    printed=$(grep -oE 'rank [0-9]+ on node [^ :]+: no progress for' "$log" | awk '{print $5}' | tr -d ':' | sort -u)
    [ -n "$printed" ] || return 0
    comm -23 <(echo "$step_nodes") <(echo "$printed") | paste -sd, -
    return 0
  fi
  # Any other failure: the first node with a task that died by a signal or with an exit code that is not
  # one of hpctrain's own (those are ends the ranks agreed on, not one node's fault).
  while IFS= read -r line; do
    [[ $line =~ $HPCTRAIN_TASK_LINE ]] || continue
    node=${BASH_REMATCH[1]} status=${BASH_REMATCH[2]}
    if [[ $status =~ ^Exited\ with\ exit\ code\ ([0-9]+)$ ]]; then
      case " $HPCTRAIN_EXIT_PREEMPTED $HPCTRAIN_EXIT_HANG $HPCTRAIN_EXIT_NO_RESTART " in
        *" ${BASH_REMATCH[1]} "*) continue ;;
      esac
    fi
    echo "$node"
    return 0
  done < <(grep -E "$HPCTRAIN_TASK_LINE" "$log")
}

hpctrain_progress() {  # LOG: "last checkpoint step S, last trained step T, steps lost N" from the ranks' lines
  local log=$1 saved trained lost=unknown
  # The checkpoint this step saved last, or else the one it resumed from.
  saved=$(sed -nE 's/.*saved checkpoint .* \(step ([0-9]+)\).*/\1/p; s/.*resumed from .* at step ([0-9]+).*/\1/p' "$log" | tail -n 1)
  trained=$(sed -nE 's/.*\[train step ([0-9]+)\].*/\1/p' "$log" | tail -n 1)
  if [ -n "$saved" ] && [ -n "$trained" ]; then
    lost=$(( trained > saved ? trained - saved : 0 ))
  fi
  echo "last checkpoint step ${saved:-unknown}, last trained step ${trained:-unknown}, steps lost $lost"
}

hpctrain_union() {  # LIST LIST: comma-separated node lists -> their union, comma-separated
  printf '%s\n' "$1" "$2" | tr ',' '\n' | grep -v '^$' | sort -u | paste -sd, -
}

# Runs the training step, e.g. `hpctrain_step -m hpctrain.resnet "$@"` (what follows the interpreter).
# Exit 0: done. Exit 85 (every rank saved a checkpoint on a signal): requeue as hpctrain_supervise does.
# Any other failure while the job is still RUNNING and no signal came: relaunch the step in this
# allocation, at most HPCTRAIN_MAX_RESTARTS times; the ranks resume from the newest checkpoint by
# themselves (--resume auto, same run dir). Not after 2, 87 or 88: a relaunch would fail the same way.
hpctrain_step() {
  local log rc restarts=0 excluded="" blamed blamed_all="" spare_note="" progress state wanted
  if [ "$HPCTRAIN_DRY_RUN" = 1 ]; then
    echo "hpctrain: dry run: $(printf '%q ' srun "${HPCTRAIN_SRUN_ARGS[@]}" "${HPCTRAIN_EXEC[@]}" "$@")"
    return 0
  fi
  log=$(mktemp "${TMPDIR:-/tmp}/hpctrain-step-${SLURM_JOB_ID:-none}.XXXXXX") \
    || { hpctrain_error "cannot create a log file in ${TMPDIR:-/tmp}"; return 2; }
  while true; do
    hpctrain_run_step "$log" "$excluded" "$@"
    rc=$?
    [ "$rc" -eq 0 ] && break
    hpctrain_step_outcome "$log" "$rc"
    if [ "$HPCTRAIN_CODE" = "$HPCTRAIN_EXIT_PREEMPTED" ]; then
      hpctrain_requeue "$HPCTRAIN_CODE"
      rc=$?
      break
    fi
    rc=$HPCTRAIN_CODE
    case " $HPCTRAIN_EXIT_NO_RESTART " in
      *" $rc "*)
        echo "hpctrain: step exit $rc ($HPCTRAIN_CAUSE): not restarting, a relaunch would fail the same way"
        break ;;
    esac
    blamed=$(hpctrain_blame "$log" "$rc")
    blamed_all=$(hpctrain_union "$blamed_all" "$blamed")
    if [ -n "$HPCTRAIN_SIGNAL" ]; then
      echo "hpctrain: step exit $rc ($HPCTRAIN_CAUSE) after SIG$HPCTRAIN_SIGNAL: not restarting"
      break
    fi
    state=$(hpctrain_job_state)
    if [ "$state" != "JobState=RUNNING" ]; then
      echo "hpctrain: step exit $rc ($HPCTRAIN_CAUSE); Slurm is ending job $(hpctrain_job) (${state:-state unknown}): not restarting"
      break
    fi
    if [ "$restarts" -ge "$HPCTRAIN_MAX_RESTARTS" ]; then
      echo "hpctrain: giving up after $restarts restart(s) in the same allocation (HPCTRAIN_MAX_RESTARTS=$HPCTRAIN_MAX_RESTARTS): last step exit $rc ($HPCTRAIN_CAUSE); blamed node(s) ${blamed_all:-none}"
      break
    fi
    # A spare node takes the place of each blamed one while spares last; without one the step restarts
    # on the same nodes (a rank that merely crashed may well run there again).
    spare_note=""
    if [ -n "$blamed" ]; then
      wanted=$(hpctrain_union "$excluded" "$blamed")
      if [ "$(echo "$wanted" | tr ',' '\n' | wc -l)" -le "$HPCTRAIN_SPARE_NODES" ]; then
        excluded=$wanted
      elif [ "$HPCTRAIN_SPARE_NODES" -gt 0 ]; then
        spare_note=" (no spare node left: HPCTRAIN_SPARE_NODES=$HPCTRAIN_SPARE_NODES)"
      fi
    fi
    restarts=$(( restarts + 1 ))
    progress=$(hpctrain_progress "$log")
    echo "hpctrain: restart $restarts/$HPCTRAIN_MAX_RESTARTS in the same allocation: step exit $rc ($HPCTRAIN_CAUSE); blamed node(s) ${blamed:-none}; excluded ${excluded:-none}$spare_note; $progress; at $(date +%T)"
  done
  rm -f "$log"
  return "$rc"
}
