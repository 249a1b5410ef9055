"""What a container image needs from the process that runs in it, whatever runtime started it. Framework-neutral,
stdlib only.

Under a host launcher (the hybrid MPI model: `srun --mpi=pmix` or `mpirun` on the host, one container per rank)
the image's Open MPI needs settings that Apptainer's `%environment` supplies, but Charliecloud's `ch-run`,
`apptainer exec --cleanenv` variants, enroot/pyxis or podman do not:

  OMPI_MCA_btl_vader_single_copy_mechanism=none  ranks of one node in separate containers (user namespaces)
                                                 cannot use CMA (process_vm_readv): with it, the first large
                                                 message hangs
  PMIX_MCA_gds=hash                              the host's PMIx server may be another release than the image's
                                                 client; the hash data store works across releases
  OPENBLAS_NUM_THREADS=1                         numpy's pool is not on the training path; it would start one
                                                 thread per core in every rank

`apply()` sets each one the environment does not already set (a site's own value wins), before any MPI library
starts in this process, under the runtimes that HPC sites start once per rank from a host launcher
(Charliecloud, Apptainer, enroot/pyxis). Outside an image, and under docker/podman (where the launcher runs in the
same container as the ranks), it does nothing; nor with HPCTRAIN_IMAGE_SETTINGS=off (a site that sets its MPI
environment itself, or to see what the runtime alone gives).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

PER_RANK_RUNTIMES = ("charliecloud", "apptainer", "enroot")
IMAGE_SETTINGS = {"OMPI_MCA_btl_vader_single_copy_mechanism": "none", "PMIX_MCA_gds": "hash",
                  "OPENBLAS_NUM_THREADS": "1"}


def runtime(env: MutableMapping[str, str] = os.environ, root: str = "/") -> str | None:
    """The container runtime this process runs under, from what each one leaves behind; None on the host."""
    r = Path(root)
    if "CH_RUNNING" in env:
        return "charliecloud"
    if env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER") or (r / ".singularity.d").is_dir():
        return "apptainer"
    if any(k.startswith("ENROOT_") for k in env) or "PYXIS_VERSION" in env:
        return "enroot"
    if (r / "run" / ".containerenv").exists():
        return "podman"
    if (r / ".dockerenv").exists():
        return "docker"
    return None


def missing(env: MutableMapping[str, str] = os.environ) -> list[str]:
    """The image settings the environment does not set."""
    return [k for k in IMAGE_SETTINGS if k not in env]


def apply(env: MutableMapping[str, str] = os.environ, root: str = "/") -> list[str]:
    """Inside an image started per rank: set what the environment lacks; returns the names set."""
    if runtime(env, root) not in PER_RANK_RUNTIMES or env.get("HPCTRAIN_IMAGE_SETTINGS") == "off":
        return []
    added = missing(env)
    for name in added:
        env[name] = IMAGE_SETTINGS[name]
    return added
