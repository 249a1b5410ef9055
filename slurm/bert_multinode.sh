#!/bin/bash
#SBATCH --job-name=hpctrain-bert
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=hpctrain-bert-%j.out
# BERT MLM pretraining: `sbatch slurm/bert_multinode.sh [hpctrain.bert flags]` from the repository root (or
# with HPCTRAIN_ROOT set); the site profile is slurm/sites/${HPCTRAIN_SITE:-default}.sh.
# --exclusive: whole nodes. Ranks: one per GPU, or --ntasks-per-node per node when the site has no GPUs.
# USR1 (300 s before the time limit): the ranks save a checkpoint and exit 85, the job requeues itself
# and the restarted job resumes from that checkpoint. SIGTERM (scancel): they save, and the job ends.
# A rank that dies ends the step at once (srun --kill-on-bad-exit); the step is then relaunched in the same
# allocation (HPCTRAIN_MAX_RESTARTS, default 2; HPCTRAIN_SPARE_NODES idle nodes can replace a blamed
# or unreachable one: then submit with `sbatch --no-kill`, or Slurm ends the job when it declares a node DOWN)
# and resumes from the newest checkpoint. hpctrain_step (slurm/env.sh), the last command, makes the batch
# shell the supervisor (python -m hpctrain.slurm supervise), which runs srun and does all of this.
# --open-mode=append keeps the output of every restart in one file. See docs/slurm.md.

# sbatch runs a copy of this file from its spool directory, so the repository comes from a variable.
HPCTRAIN_ROOT=${HPCTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$HPCTRAIN_ROOT/slurm/env.sh" ]; then
  echo "hpctrain: error: HPCTRAIN_ROOT=$HPCTRAIN_ROOT has no slurm/env.sh: submit from the repository root or set HPCTRAIN_ROOT" >&2
  exit 2
fi
source "$HPCTRAIN_ROOT/slurm/env.sh" || exit 2
cd "$HPCTRAIN_ROOT" || exit 2

hpctrain_step -m hpctrain.bert "$@"
