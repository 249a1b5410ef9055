"""Nothing of the emulated hosts outlives them (their management network included): after a test that failed,
and after a run that was killed (the next start sweeps it). Runs after test_hosts.py, whose module network must
be gone by then too."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.network.hosts import NETNS_ETC, SSHD_RUN_DIR, Hosts, leftovers

pytestmark = pytest.mark.network


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the network tier needs root and iproute2")


def machine_state() -> dict:
    """What the harness must leave as it found it, seen from this (the machine's own) namespace."""
    def out(*cmd):
        return subprocess.run(list(cmd), capture_output=True, text=True).stdout
    return {"links": out("ip", "-o", "link", "show").count("\n"), "addresses": out("ip", "-o", "addr", "show"),
            "routes": out("ip", "route", "show"), "netns": out("ip", "netns", "list"),
            "etc_hosts": Path("/etc/hosts").read_text(), "etc_netns": NETNS_ETC.exists(),
            "run_sshd": SSHD_RUN_DIR.exists()}


def alive(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("Z", "X"):
            found.append(pid)
    return found


def test_nothing_remains_after_the_module_network_or_a_failed_test(tmp_path):
    assert leftovers() == []  # test_hosts.py's network (if it ran) is gone
    before = machine_state()
    h = Hosts(tmp_path / "a", names=["host1", "host2"], rates={"host2": "1gbit"}, management=True)
    with pytest.raises(AssertionError):
        try:
            h.start(log=lambda m: None)
            pids = h.sshd_pids()
            assert len(alive(pids)) == 2
            assert h.counters("host2", "mgmt0")["rx"] >= 0  # the management interface is there too
            h.link_down("host2")  # a test that failed with a link down
            reach = h.run("host1", ["timeout", "2", "bash", "-c", "echo > /dev/tcp/host2/22"])
            assert reach.returncode == 0, "host2 is cut off"
        finally:
            h.stop()
    assert leftovers() == []
    assert alive(pids) == []
    assert machine_state() == before


def test_a_killed_run_is_swept_by_the_next_start(tmp_path):
    before = machine_state()
    crashed = Hosts(tmp_path / "a", names=["host1", "host2"], management=True)
    crashed.start(log=lambda m: None)
    stale = crashed.sshd_pids()
    # The process that made it died without stop(): everything it built is still there.
    assert len(alive(stale)) == 2 and "link hpxt-brm" in " ".join(leftovers())
    swept: list[str] = []
    h = Hosts(tmp_path / "b", names=["host1", "host2", "host3"])
    try:
        h.start(log=swept.append)
        assert alive(stale) == []
        assert swept and "netns hpxt-host1" in swept[0] and "link hpxt-brm" in swept[0]  # the management bridge
        assert h.ssh("host1", "host3", "hostname", timeout=30).stdout.strip() == "host3"
    finally:
        h.stop()
    assert leftovers() == []
    assert machine_state() == before
