"""The doctor's network check, its pure part: the ring and its phases, which host or link is slow, the WARN
threshold, the line, the table and what --json carries; and the report's table rows. No MPI, no network."""
import json
from argparse import Namespace

import pytest

from hpctrain.cluster import ClusterEnv
from hpctrain.doctor.checks.network import Link, assess, busbw_text, phases, ring, table, verdict
from hpctrain.doctor.common import Check, Context
from hpctrain.doctor.registry import REGISTRY
from hpctrain.doctor.report import report

pytestmark = pytest.mark.unit
MIB16 = 16 << 20


def links_of(rates: list[float], names=None, latency=50.0) -> list[Link]:
    """The ring over len(rates) hosts, link i (host i+1 -> host i+2) at rates[i] Gbit/s."""
    names = names or [f"node{i + 1}" for i in range(len(rates))]
    return [Link(names[a], names[b], r, latency, MIB16) for (a, b), r in zip(ring(len(rates)), rates)]


def test_ring_links_each_host_sends_to_the_next():
    assert ring(1) == [] and ring(0) == []
    assert ring(2) == [(0, 1), (1, 0)]
    assert ring(3) == [(0, 1), (1, 2), (2, 0)]
    assert ring(5)[-1] == (4, 0)


@pytest.mark.parametrize("n, groups", [(2, 2), (3, 3), (4, 2), (5, 3), (8, 2), (9, 3)])
def test_phases_cover_every_link_once_and_no_host_twice_at_a_time(n, groups):
    links = ring(n)
    found = phases(links)
    assert len(found) == groups
    assert sorted(k for g in found for k in g) == list(range(n))
    for g in found:
        hosts = [h for k in g for h in links[k]]
        assert len(hosts) == len(set(hosts)), (n, g)


def test_a_slow_host_is_the_one_on_both_slow_links():
    # host3 shaped to 1/100: its two ring links (host2 -> host3, host3 -> host1) are slow, host1 -> host2 is not
    slow_hosts, slow_links = assess(links_of([9.1, 0.095, 0.096], ["host1", "host2", "host3"]))
    assert slow_hosts == ["host3"] and slow_links == []
    # the median link is a slow one here (2 of 3): the hosts' best links tell them apart
    slow_hosts, _ = assess(links_of([9.0, 9.2, 0.9, 0.95, 9.1]))
    assert slow_hosts == ["node4"]


def test_a_slow_link_between_fast_hosts_is_named_as_a_path():
    slow_hosts, slow_links = assess(links_of([9.0, 9.2, 0.5, 9.1]))
    assert slow_hosts == [] and [(ln.src, ln.dst) for ln in slow_links] == [("node3", "node4")]


def test_the_warn_threshold_is_half_the_median():
    assert assess(links_of([10.0, 10.0, 5.1]))[0] == []       # host3's best is 10 (its link to host1)
    assert assess(links_of([10.0, 5.1, 5.1]))[0] == []        # 0.51 of the median host: not slow
    assert assess(links_of([10.0, 4.9, 4.9]))[0] == ["node3"]  # 0.49: slow
    assert assess(links_of([10.0, 4.9, 4.9]), fraction=0.4)[0] == []


def test_two_hosts_cannot_tell_which_one_is_slow():
    slow_hosts, slow_links = assess(links_of([0.1, 0.1]))  # both links join the same two hosts
    assert slow_hosts == [] and slow_links == []
    assert assess(links_of([9.0, 6.0]))[1] == []  # CPU-bound noise between two fast directions: no WARN
    assert [ln.src for ln in assess(links_of([9.0, 0.1]))[1]] == ["node2"]  # one direction far below


def test_uniform_links_pass_with_the_range_latency_and_busbw_ratio():
    (status, found, fix), data = verdict(links_of([9.0, 9.5, 9.2], ["a", "b", "c"]), {"horovod": 0.9, "mpi4py": 1.0})
    assert status == "PASS" and fix is None
    assert found == ("3 ring links between 3 nodes: 9-9.5 Gbit/s, latency 50 us, slowest a -> b 9 Gbit/s; "
                     "allreduce busbw 8 Gbit/s (mpi4py) = 0.89 x the slowest link")
    assert data["slow_hosts"] == [] and data["allreduce_lib"] == "mpi4py"
    assert data["allreduce_vs_slowest"] == pytest.approx(8 / 9)
    assert data["table"] == ["a -> b: 9 Gbit/s, 50 us", "b -> c: 9.5 Gbit/s, 50 us", "c -> a: 9.2 Gbit/s, 50 us"]


def test_a_slow_host_warns_naming_it_with_the_fix():
    links = links_of([9.1, 0.0953, 0.0961], ["host1", "host2", "host3"])
    (status, found, fix), data = verdict(links, {"mpi4py": 0.0115})
    assert status == "WARN"
    assert found.startswith("slow node host3: its links at most 0.0961 Gbit/s, 0.011 x the others' 9.1 Gbit/s; ")
    assert "slowest host2 -> host3 0.0953 Gbit/s; allreduce busbw 0.092 Gbit/s (mpi4py) = 0.97 x the slowest " \
           "link" in found
    assert "host3's NIC" in fix and "--exclude=host3" in fix and "drop it from -H" in fix
    assert data["table"] == ["host1 -> host2: 9.1 Gbit/s, 50 us", "host2 -> host3: 0.0953 Gbit/s, 50 us (slow)",
                             "host3 -> host1: 0.0961 Gbit/s, 50 us (slow)"]
    assert data["slow_hosts"] == ["host3"] and json.loads(json.dumps(data)) == data  # JSON as it is


def test_a_slow_link_warns_naming_the_path():
    (status, found, fix), data = verdict(links_of([9.0, 9.2, 0.5, 9.1]))
    assert status == "WARN" and found.startswith("slow link node3 -> node4 (0.5 Gbit/s) between fast nodes; ")
    assert "cabling" in fix and data["slow_links"] == ["node3 -> node4"]
    assert table(links_of([9.0, 0.5]), [], links_of([9.0, 0.5])[1:])[1].endswith("(slow)")


def test_no_allreduce_figure_no_ratio():
    assert busbw_text({}, Link("a", "b", 1.0, 1.0, 1)) == ""
    (_, found, _), data = verdict(links_of([1.0, 1.0]))
    assert "allreduce" not in found and "allreduce_busbw_gbit_s" not in data
    assert "latency 20-50 us" in verdict([Link("a", "b", 1.0, 20.0, 1), Link("b", "a", 1.0, 50.4, 1)])[0][1]


def test_registered_beside_the_collectives_under_their_one_alone_line():
    spec = REGISTRY["network"]
    assert spec.ranks == "all" and spec.min_ranks == 2 and spec.waits  # --timeout bounds it
    assert spec.alone[0] == "collectives" and spec.order > REGISTRY["mpi4py allreduce"].order
    alone = Context(Namespace(), ClusterEnv(0, 0, 2, 2, 0, "openmpi"))
    assert "mpi4py does not connect" in spec.when(alone)  # no mpi4py world: a SKIP, no collective
    alone.spans = {"mpi4py"}
    assert spec.when(alone) is None


@pytest.mark.parametrize("as_json", [False, True])
def test_report_prints_the_table_under_its_line_and_json_carries_it(capsys, as_json):
    ctx = Context(Namespace(json=as_json), ClusterEnv(0, 0, 3, 1, 0, "openmpi"))
    _, data = verdict(links_of([9.1, 0.0953, 0.0961], ["host1", "host2", "host3"]))
    ctx.facts.update(tables={"network": data["table"]}, json={"network": data})
    report(ctx, [Check("PASS", "mpi4py broadcast", "ok"), Check("WARN", "network", "slow node host3", "fix"),
                 Check("PASS", "run dir", "ok")], "mpirun -np 3")
    out = capsys.readouterr().out
    if as_json:
        doc = json.loads(out)
        assert doc["network"]["table"] == data["table"] and doc["network"]["slow_hosts"] == ["host3"]
        assert [c["name"] for c in doc["checks"]] == ["mpi4py broadcast", "network", "run dir"]
    else:
        assert out.splitlines() == ["PASS  mpi4py broadcast: ok", "WARN  network: slow node host3 -> fix",
                                    "    host1 -> host2: 9.1 Gbit/s, 50 us",
                                    "    host2 -> host3: 0.0953 Gbit/s, 50 us (slow)",
                                    "    host3 -> host1: 0.0961 Gbit/s, 50 us (slow)",
                                    "PASS  run dir: ok", "launch: mpirun -np 3"]
