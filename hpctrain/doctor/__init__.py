"""Preflight: will this installation run on this cluster? `python -m hpctrain.doctor`, alone or under
mpirun / horovodrun / srun. One line per check, `PASS|WARN|FAIL|SKIP  <check>: <found>[ -> <fix>]`, then
`launch: <command>` for --entry (resnet or bert) under the launcher found; exit 1 if any FAIL, 2 for a bad flag;
--json prints one JSON document instead.

Every rank runs the checks and sends them to rank 0 (mpi4py gather, or Horovod's under horovodrun --gloo),
which prints its own line per check plus any rank that found something else, by rank and host. Checks marked
for rank 0 alone (the run-directory write test: the one rank that writes checkpoints and metrics) run there
after the gather. A wait for the other ranks longer than --timeout (a missing peer, a blocked network), or a
check that hangs, becomes a FAIL line instead of a hang (deadline.py).

    registry.py   `@check(name, order=, ranks=, min_ranks=, when=, waits=, error_fix=)`: a check is one function
    checks/       the checks, one module per topic: software (Python, PyTorch, TensorFlow, Horovod and its
                  TensorFlow ops), launchers (mpirun, srun, ctrl-c), mpi (mpi4py, ranks, mpi library),
                  devices (gpus, tf devices), tf_config (tf config, tf port), collectives, network
                  (the links between the nodes), run_dir
    common.py     the per-rank Context (flags, launch, lines, facts, MPI/Horovod handles), probes
    cli.py        flags (hpctrain.oneline), the launch, run -> gather -> rank 0 reports -> shared verdict
    launch.py     the `launch:` line;  report.py  the merge and the output;  deadline.py  the --timeout

Framework-neutral on import: torch, TensorFlow, Horovod and mpi4py are imported inside the checks that use them.
"""
