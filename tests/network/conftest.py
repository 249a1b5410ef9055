"""One network of emulated hosts per test module (see hosts.py): host1 and host2 at the default 10 Gbit/s,
host3 a slow host at 100 Mbit/s."""
import os
import shutil
import sys
import tempfile

import pytest

from tests.network.hosts import Hosts, HostsError, ensure_installed


def _needs_root_and_netns() -> str | None:
    if os.geteuid() != 0:
        return "the network tier needs root (network namespaces, links, sshd)"
    if shutil.which("ip") is None and shutil.which("apt-get") is None:
        return "no iproute2 and no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def hosts():
    why = _needs_root_and_netns()
    if why:
        pytest.skip(why)
    installed = ensure_installed(log=lambda m: print(m, file=sys.stderr))
    base = tempfile.mkdtemp(prefix="hpxt-")  # short: sshd and Open MPI put sockets and keys under it
    h = Hosts(base, names=["host1", "host2", "host3"], rates={"host3": "100mbit"})
    try:
        h.started_in = h.start(log=lambda m: print(m, file=sys.stderr))
    except HostsError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"emulated hosts did not start: {e}")
    h.installed_in = installed
    print(f"\nnetwork hosts: {', '.join(f'{n} {h.address[n]} {h.rate[n]}' for n in h.names)} up in "
          f"{h.started_in:.1f} s (package install {installed:.1f} s), state in {base}", file=sys.stderr)
    try:
        yield h
    finally:
        h.stop()
        shutil.rmtree(base, ignore_errors=True)
