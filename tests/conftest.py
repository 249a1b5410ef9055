"""Test tiers as pytest markers, from where a test lives (registered in pyproject.toml):

    unit       tests/unit: one process, patched environments, seconds   (`make check` runs these)
    mpi        tests/parallel, tests/integration: real ranks under mpirun/horovodrun, the CLI end to end
    tf         any test of the TensorFlow engine (test_tf_* files, or a test named *tf*)
    slurm      tests/slurm: a real Slurm test cluster
    container  tests/containers: the image built and run
    benchmark  tests/benchmarks: each benchmark script at tiny sizes
    network    tests/network: emulated hosts with their own network (marked in the modules)
    bigmem     objects over 2 GiB between two ranks (tests/parallel/test_transfer.py; marked in the module)

`make test` runs unit, mpi and tf; `make test-bench` benchmark; `make test-cluster` slurm, container and network
(they stand up infrastructure first) and bigmem (~16 GiB free memory); `make test-all` all three.
`pytest -m "not slurm and not container"` or `-m tf` pick tiers."""
from __future__ import annotations

import pytest

TIERS = {"unit": "unit", "parallel": "mpi", "integration": "mpi", "slurm": "slurm", "containers": "container",
         "benchmarks": "benchmark"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        tier = next((TIERS[p] for p in parts[parts.index("tests") + 1:-1] if p in TIERS), None)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if item.path.name.startswith("test_tf") or "tf" in item.name.split("[")[0].split("_"):
            item.add_marker(pytest.mark.tf)
