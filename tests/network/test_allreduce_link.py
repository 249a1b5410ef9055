"""benchmarks/network_allreduce.py at one size on 2 hosts whose links run at 1 Gbit/s: every engine's bus
bandwidth beside the link rate, which it cannot pass (a small run of the documented full one). Starts its own
hosts (no module network is up while it runs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.launch import ROOT, env

pytestmark = pytest.mark.network


def test_allreduce_against_the_link_rate(tmp_path):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the network tier needs root and iproute2")
    p = subprocess.run([sys.executable, "benchmarks/network_allreduce.py", "--hosts", "2", "--rates", "1gbit",
                        "--min-bytes", "4M", "--max-bytes", "4M", "--variant-sizes", "1M", "--repeats", "2",
                        "--budget-s", "0.3", "--out", str(tmp_path)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    data = json.loads(next(tmp_path.glob("*-network-allreduce.json")).read_text())
    (run,) = data["runs"]
    assert run["np"] == 2 and run["link_rate"] == "1gbit" and run["link_GBps"] == 0.125
    ratios = {r["engine"]: r["busbw_vs_link"] for r in run["rows"]
              if r["bytes"] == 4 * 2**20 and r["engine"] != "numpy_copy"}
    assert {"mpi4py", "horovod", "hpctrain", "torch_gloo"} <= set(ratios), ratios
    # the link is the limit: no engine past it (tbf's bucket allows a little), the best one near it
    assert max(ratios.values()) <= 1.1 and data["summary"][0]["best_vs_link"] >= 0.6, ratios
    # the bytes crossed the links: each host sent at least what its allreduces of 4 MiB and 1 MiB imply, once
    assert all(sent > 5 * 2**20 for sent in run["network"]["sent_bytes_per_host"].values()), run["network"]


def test_bad_rate_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/network_allreduce.py", "--rates", "1gb"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "rate '1gb': expected a number followed by gbit, mbit or kbit" in p.stderr
    assert p.stderr.count("error") == 1 and "Traceback" not in p.stderr, p.stderr  # argparse's usage + one line
