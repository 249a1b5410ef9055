"""What every entry point shares: the run from parsed flags to exit code, and the one-line error path.

    detect the launcher -> parse the config (the recipe's) -> announce -> preemption handler -> hang
    watchdog -> build a resumed trainer (hpctrain.engine.build: the engine of --framework, the recipe) ->
    hpctrain.loop.train(trainer) -> the recipe's after-train hook -> report -> close (every rank waits for
    rank 0) -> exit 0, or 85 after an agreed stop

Any `ExitError` (bad input: exit 2; failed checkpoint save: 87; non-finite loss: 88) becomes one
line on stderr, printed by rank 0 only (see `report_error`).
"""
from __future__ import annotations

import json
import os
import sys

from hpctrain import image, loop, netiface, preempt, recipes, rundir, runlock, watchdog
from hpctrain.cluster import ClusterEnv, detect
from hpctrain.config import parse
from hpctrain.engine.build import build_trainer
from hpctrain.errors import EXIT_PREEMPTED, ExitError

# How long a non-zero rank that hit an error waits for rank 0 to report it and for the launcher to
# end the job, before it concludes the error was its own and prints it itself.
PEER_REPORT_GRACE_S = 15.0  # rank 0 may reach the same error seconds later on a loaded node: wait it out


def one_write_per_line() -> None:
    """Emit each line with one write(). With PYTHONUNBUFFERED=1 (common on clusters and in containers)
    print() writes the text and the newline separately, and Open MPI's --tag-output (horovodrun) then
    tags the bare newline and glues two ranks' lines together."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):  # replaced by a harness, or already closed
            pass


def report_error(prog: str, error: ExitError, rank: int | None, preemption=None) -> int:
    """One line for the whole job. Errors from the config, the launcher or a collective verdict are the
    same on every rank: rank 0 prints and leaves at once; the launcher then ends the job (mpirun: SIGCONT to
    every rank at once, SIGTERM and SIGKILL `odls_base_sigkill_timeout` seconds apart), and the others, waiting
    for that notice, leave without a word. A rank that gets no notice within the grace period had an error of
    its own (rank 0 did not fail), and says so."""
    if rank:
        if not preempt.job_ending_within(PEER_REPORT_GRACE_S, preemption):
            print(f"{prog}: error (rank {rank}): {error}", file=sys.stderr, flush=True)
    else:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        rundir.update_status(state="failed", exit_code=error.exit_code, reason=str(error))
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal interpreter exit: Open MPI's MPI_Finalize (run at exit by mpi4py or Horovod) waits for the
    # other ranks: rank 0's would make the others wait out their grace period and print too; theirs would wait
    # for a rank 0 that is gone until the launcher's SIGKILL.
    runlock.release_all()
    os._exit(error.exit_code)


def main(recipe_name: str, argv: list[str] | None = None) -> int:
    """`python -m hpctrain.<recipe_name>`: the whole run, returning the exit code."""
    one_write_per_line()
    preempt.watch_for_job_end()  # a launcher's notice that another rank failed first (see report_error)
    image.apply()  # inside a container: the MPI settings its runtime may not have set, before any MPI starts
    recipe = recipes.get(recipe_name)
    prog, rank, trainer, closed, preemption = recipe.prog, None, None, False, None
    try:
        cluster = detect()
        rank = cluster.rank
        nets = netiface.apply()  # the site's interface (HPCTRAIN_NET_IFACE) for every library, before any starts
        cfg = parse(argv, prog, recipe.config_cls)
        if rank == 0:
            print(f"{prog}: {cluster.launcher} launcher, {cluster.size} rank(s) on {cluster.num_nodes} node(s)")
            if nets.line():
                print(f"{prog}: {nets.line()}")
            print(f"{prog}: config {json.dumps(cfg.to_dict(), sort_keys=True)}")
        preemption = preempt.Preemption().install()  # from here SIGUSR1/SIGTERM only set a flag
        watchdog.start(cfg.run.hang_timeout, cfg.run.run_dir, cluster.rank, cluster.node_name, cfg.run.startup_timeout)
        trainer = build_trainer(recipe, cfg, cluster)
        try:
            result = loop.train(trainer, cfg.run, cluster.rank, preemption)
            with watchdog.phase("finish"):
                if trainer.after_train is not None and "stopped_by_signal" not in result:
                    trainer.after_train(trainer, cfg)
                code = report(prog, cluster, trainer.step, result)
                trainer.close()  # every rank waits here until rank 0 has written and reported everything
                closed = True
        finally:
            if not closed:
                trainer.close(collective=False)  # an error: flush metrics, free the lock; no collective
        watchdog.stop()
        return code
    except ExitError as e:
        return report_error(prog, e, rank, preemption)
    except BaseException as e:  # a crash (exit 1, its traceback follows): the run's status says so
        rundir.update_status(state="failed", exit_code=1, reason=f"{type(e).__name__}: {e}".splitlines()[0])
        raise


def report(prog: str, cluster: ClusterEnv, step: int, result: dict) -> int:
    """Rank 0 reports the outcome; a preempted run exits with EXIT_PREEMPTED so the batch script knows
    to requeue (the checkpoint is on disk: every rank learnt that from the save's collective)."""
    if "stopped_by_signal" in result:
        rundir.update_status(state="stopped", step=step, exit_code=EXIT_PREEMPTED, reason=result["stopped_by_signal"])
        if cluster.rank == 0:
            print(f"{prog}: stopped at step {step} on {result['stopped_by_signal']}, checkpoint saved: exit "
                  f"{EXIT_PREEMPTED} (requeue or rerun the same command to resume)", flush=True)
        return EXIT_PREEMPTED
    rundir.update_status(state="done", step=step, exit_code=0, reason=None)
    if cluster.rank == 0:
        print(f"{prog}: done at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                            if isinstance(v, float)), flush=True)
    return 0
