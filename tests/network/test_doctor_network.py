"""`python -m hpctrain.doctor` measures the links between the hosts (conftest.py: host1 and host2 at 10 Gbit/s,
host3 at 100 Mbit/s): the ring's table, the slow host named in a WARN, and no WARN between two fast hosts."""
from __future__ import annotations

import json
import sys
import time

import pytest

from tests.network.hosts import rate_bits
from tests.network.test_hosts import mpirun, on_host

pytestmark = pytest.mark.network
BYTES = 4 << 20  # the collectives' size too: at 100 Mbit/s each of their 6 runs takes about half a second


def doctor(hosts, names: list[str], tmp_path) -> tuple[dict, dict, float]:
    """The doctor under `mpirun -H` across `names`, launched on the first: (the JSON report, its network
    check, seconds)."""
    t0 = time.monotonic()
    p = on_host(hosts, names[0], mpirun(hosts, names, [
        "-m", "hpctrain.doctor", "--json", "--bytes", str(BYTES), "--timeout", "60",
        "--run-dir", str(tmp_path / "doctor")]), timeout=180)
    took = time.monotonic() - t0
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    report = json.loads(lines[-1])
    failed = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert not failed and p.returncode == 0, (failed, p.stderr[-2000:])
    check = next(c for c in report["checks"] if c["name"] == "network")
    return report, check, took


def test_doctor_table_names_the_slow_host(hosts, tmp_path):
    report, check, took = doctor(hosts, ["host1", "host2", "host3"], tmp_path)
    net = report["network"]
    print(f"\ndoctor on host1,host2,host3 ({took:.1f} s): {check['status']}  network: {check['detail']} -> "
          f"{check['fix']}\n    " + "\n    ".join(net["table"]), file=sys.stderr)
    links = {(ln["src"], ln["dst"]): ln for ln in net["links"]}
    assert list(links) == [("host1", "host2"), ("host2", "host3"), ("host3", "host1")], net["table"]
    slow_rate = rate_bits(hosts.rate["host3"]) / 1e9
    for (src, dst), ln in links.items():
        assert ln["latency_us"] > 0, ln
        if "host3" in (src, dst):  # shaped to 100 Mbit/s: the link rate is the limit
            assert 0.5 <= ln["gbit_s"] / slow_rate <= 1.1, ln
        else:  # 10 Gbit/s: far above, whatever the cores allow
            assert ln["gbit_s"] >= 5 * slow_rate, ln
    assert check["status"] == "WARN" and check["detail"].startswith("slow node host3: "), check
    assert "--exclude=host3" in check["fix"], check
    assert net["slow_hosts"] == ["host3"] and "host3" in (net["slowest"]["src"], net["slowest"]["dst"]), net
    assert [row.endswith("(slow)") for row in net["table"]] == [False, True, True], net["table"]
    # the allreduce crosses host3's links: its bus bandwidth is bounded by the slowest link's rate
    assert 0 < net["allreduce_vs_slowest"] <= 1.2, net
    assert "x the slowest link" in check["detail"]


def test_doctor_between_two_fast_hosts_does_not_warn(hosts, tmp_path):
    report, check, took = doctor(hosts, ["host1", "host2"], tmp_path)
    net = report["network"]
    print(f"\ndoctor on host1,host2 ({took:.1f} s): {check['status']}  network: {check['detail']}\n    "
          + "\n    ".join(net["table"]), file=sys.stderr)
    assert check["status"] == "PASS" and check["fix"] is None, check
    assert [(ln["src"], ln["dst"]) for ln in net["links"]] == [("host1", "host2"), ("host2", "host1")]
    assert all(ln["gbit_s"] >= 5 * rate_bits(hosts.rate["host3"]) / 1e9 for ln in net["links"]), net["table"]
    assert net["slow_hosts"] == [] and net["slow_links"] == []
