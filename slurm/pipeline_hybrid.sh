#!/bin/bash
#SBATCH --job-name=hpctrain-pipeline
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=hpctrain-pipeline-%j.out
# Pipeline x data parallel training: `sbatch slurm/pipeline_hybrid.sh [training flags]` from the repository
# root (or with HPCTRAIN_ROOT set); the site profile is slurm/sites/${HPCTRAIN_SITE:-default}.sh.
# Settings (environment of sbatch, e.g. `MODEL=bert PIPELINE_STAGES=4 sbatch slurm/pipeline_hybrid.sh ...`):
#   MODEL              resnet | bert: python -m hpctrain.resnet or hpctrain.bert        (default resnet)
#   PIPELINE_STAGES    P, stages; the world size must be a multiple of P               (default 2)
#   MICRO_BATCHES      M, micro-batches per step and replica, at least P               (default 8)
#   SCHEDULE           1f1b | gpipe                                                     (default 1f1b)
#   PIPELINE_PARTITION time | params | uniform | a plan .json file                      (default time)
#                      (not PARTITION: HPCTRAIN_PARTITION is the Slurm partition of the site file)
#   RUN_DIR            run directory; default <submit dir>/runs/pipeline-<job id>, so a requeued job
#                      resumes from its checkpoints and reuses the plan saved there (pipeline_plan.json)
# Flags after the script go to the training module after these, so they win (--pipeline-allreduce
# horovod, --config ...); set the pipeline size through PIPELINE_STAGES, which the check below uses.
#
# Layout: world size W = nodes x ranks per node = P stages x D replicas (D = W / P). Rank r is stage
# r // D of replica r % D: consecutive ranks are the D replicas of one stage. Who talks to whom:
#   - rank r sends activations to r + D and gradients back to r - D (same replica, next/previous
#     stage), once per micro-batch: point-to-point, the size of the activations at the cut;
#   - ranks s*D .. s*D+D-1 (stage s) average their stage's gradients once per step: an allreduce
#     the size of the stage's parameters.
# srun places ranks in blocks (ranks 0..T-1 on the first node, T = ranks per node). With D a multiple
# of T each node holds one stage only: stage s is a contiguous run of D/T whole nodes (same memory
# footprint on each of them), its gradient allreduce stays within those nodes, and every stage-to-stage
# transfer crosses the network. With T a multiple of D a node holds T/D whole stages and the transfers
# between those stay on the node, while the allreduce goes across nodes. The default (4 nodes x 1 rank,
# P=2) is stage 0 on nodes 1-2 and stage 1 on nodes 3-4; with 4 GPUs per node, 16 ranks, D=8.
# USR1, SIGTERM, exit 85, requeue and in-job restarts (hpctrain_step, the last command) as in resnet_8node.sh.
# Pipeline mode calls mpi4py (MPI_COMM_WORLD) directly: srun must start the ranks as one MPI job
# (HPCTRAIN_SRUN_MPI, pmix for Open MPI). See docs/slurm.md.

# sbatch runs a copy of this file from its spool directory, so the repository comes from a variable.
HPCTRAIN_ROOT=${HPCTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$HPCTRAIN_ROOT/slurm/env.sh" ]; then
  echo "hpctrain: error: HPCTRAIN_ROOT=$HPCTRAIN_ROOT has no slurm/env.sh: submit from the repository root or set HPCTRAIN_ROOT" >&2
  exit 2
fi
source "$HPCTRAIN_ROOT/slurm/env.sh" || exit 2
cd "$HPCTRAIN_ROOT" || exit 2

MODEL=${MODEL:-resnet}
PIPELINE_STAGES=${PIPELINE_STAGES:-2}
MICRO_BATCHES=${MICRO_BATCHES:-8}
SCHEDULE=${SCHEDULE:-1f1b}
PIPELINE_PARTITION=${PIPELINE_PARTITION:-time}
HPCTRAIN_JOB_KEY=${SLURM_JOB_ID:-none}
[ -n "${SLURM_ARRAY_JOB_ID:-}" ] && HPCTRAIN_JOB_KEY=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
RUN_DIR=${RUN_DIR:-${SLURM_SUBMIT_DIR:-$HPCTRAIN_ROOT}/runs/pipeline-$HPCTRAIN_JOB_KEY}

# Checked before anything is evaluated as a number (bash arithmetic would run $(...) in a value).
[[ $MODEL =~ ^(resnet|bert)$ ]] || { hpctrain_error "MODEL='$MODEL' is not allowed (allowed: resnet, bert)"; exit 2; }
[[ $PIPELINE_STAGES =~ ^[1-9][0-9]*$ ]] \
  || { hpctrain_error "PIPELINE_STAGES='$PIPELINE_STAGES' is not a positive integer"; exit 2; }
# The ranks srun will start (env.sh): one per GPU in GPU mode, else the job's tasks, without spare nodes.
HPCTRAIN_WORLD=$HPCTRAIN_STEP_TASKS
[[ $HPCTRAIN_WORLD =~ ^[1-9][0-9]*$ ]] \
  || { hpctrain_error "no task count (SLURM_NTASKS='${SLURM_NTASKS:-}'): run this script with sbatch"; exit 2; }
if (( HPCTRAIN_WORLD % PIPELINE_STAGES != 0 )); then
  hpctrain_error "PIPELINE_STAGES=$PIPELINE_STAGES does not divide the $HPCTRAIN_WORLD ranks of this job (nodes x ranks per node must be a multiple of the stages)"
  exit 2
fi
echo "hpctrain: pipeline $PIPELINE_STAGES stage(s) x $(( HPCTRAIN_WORLD / PIPELINE_STAGES )) replica(s) = $HPCTRAIN_WORLD ranks, run dir $RUN_DIR"

hpctrain_step -m "hpctrain.$MODEL" --run-dir "$RUN_DIR" \
  --pipeline-stages "$PIPELINE_STAGES" --micro-batches "$MICRO_BATCHES" --pipeline-schedule "$SCHEDULE" \
  --partition "$PIPELINE_PARTITION" "$@"
