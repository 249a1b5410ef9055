"""`python -m hpctrain.slurm [options]` renders a batch script; `python -m hpctrain.slurm supervise ...` runs and
supervises the training step inside the job (hpctrain.slurm.supervise)."""
import sys

if sys.argv[1:2] == ["supervise"]:
    # The supervisor runs on the host's python (HPCTRAIN_HOST_PYTHON), which may be older than hpctrain's.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"hpctrain: error: the supervisor needs Python 3.11 or newer, {sys.executable} is "
                 f"{sys.version.split()[0]} (allowed: HPCTRAIN_HOST_PYTHON=<a python3.11 or newer>)")
    from hpctrain.slurm.supervise import main as supervise

    sys.exit(supervise(sys.argv[2:]))

from hpctrain.slurm import main

sys.exit(main())
