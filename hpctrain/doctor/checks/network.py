"""The links between the nodes (ranks on 2+ hosts, connected by mpi4py): bandwidth and latency of every ring link,
the slowest named, a slow node named, and the allreduce bus bandwidth against the slowest link's rate.

One rank per host (the lowest) takes part; the hosts form a ring in rank order and each ring link
`host i -> host i+1` is measured point to point: latency as half the median of LATENCY_ROUNDS 8-byte round
trips, bandwidth as the best of up to REPEATS messages of --bytes (smaller on a link too slow to carry --bytes in
MESSAGE_S), each acknowledged. Links that share no host are measured at the same time (two phases for an even
ring, three for an odd one), so the check takes seconds however many nodes, and a link is never measured while
one of its hosts is busy with another. Same-host pairs are never measured: they move memory, not a link.
It runs after the collectives (whose allreduce bus bandwidth it sets beside the slowest link) and first shuts
Horovod down: Horovod's background thread polls MPI, and beside it an 8-byte round trip took 4 ms instead of
12 us and bandwidth fell by 5x (measured); the gather and the verdict then go over mpi4py.

A ring shows a slow host on both of its links: a host whose best link is below SLOW_FRACTION of the median host's
best is named; a link below SLOW_FRACTION of the median link while both its hosts are fast elsewhere is named as
the path between them (a cable, a switch port).
"""
from __future__ import annotations

import socket
import statistics
import time
from dataclasses import asdict, dataclass

from hpctrain.doctor.checks.collectives import ALONE, NETWORK_FIX
from hpctrain.doctor.common import NOT_MPI, Context
from hpctrain.doctor.registry import Outcome, check

SLOW_FRACTION = 0.5  # a host (or link) below this fraction of the median is slow
LATENCY_ROUNDS, LATENCY_WARMUP = 100, 10
PROBE_BYTES = 1 << 20  # the first message: connection and buffers warm, and a first rate to size the next ones
MESSAGE_S = 1.0  # a timed message is cut to what the link carries in this time (never below PROBE_BYTES)
REPEATS, LINK_BUDGET_S = 3, 1.5  # up to REPEATS timed messages, none started after LINK_BUDGET_S on the link
NAME_BYTES = 256
TAG = 23_004


@dataclass(frozen=True)
class Link:
    """One measured ring link, from `src` to `dst` (node names)."""
    src: str
    dst: str
    gbit_s: float
    latency_us: float
    nbytes: int


def ring(n: int) -> list[tuple[int, int]]:
    """The ring's links over n hosts, as (sender, receiver) indices: i -> i+1, the last back to the first."""
    return [(i, (i + 1) % n) for i in range(n)] if n >= 2 else []


def phases(links: list[tuple[int, int]]) -> list[list[int]]:
    """The links' indices grouped so that no host is in two links of one group (measured at the same time):
    an even ring in 2 groups, an odd ring in 3, two hosts (one link each way) in 2."""
    groups: list[tuple[list[int], set[int]]] = []
    for k, (a, b) in enumerate(links):
        for members, busy in groups:
            if a not in busy and b not in busy:
                members.append(k)
                busy.update((a, b))
                break
        else:
            groups.append(([k], {a, b}))
    return [members for members, _ in groups]


def assess(links: list[Link], fraction: float = SLOW_FRACTION) -> tuple[list[str], list[Link]]:
    """(slow hosts, slow links between fast hosts). A host's rate is its best link's (a host's own NIC bounds
    every link it is on), compared with the median host's: with 3+ hosts a slow host stands out; with 2 both
    hosts share both links and none can be told. A link is slow below `fraction` of the median link."""
    best: dict[str, float] = {}
    for ln in links:
        for host in (ln.src, ln.dst):
            best[host] = max(best.get(host, 0.0), ln.gbit_s)
    slow_hosts = []
    if len(best) >= 3:
        ref = statistics.median(best.values())
        slow_hosts = [h for h, rate in best.items() if rate < fraction * ref]
    median_link = statistics.median(ln.gbit_s for ln in links) if links else 0.0
    slow_links = [ln for ln in links if ln.gbit_s < fraction * median_link
                  and ln.src not in slow_hosts and ln.dst not in slow_hosts]
    return slow_hosts, slow_links


def gbit(x: float) -> str:
    return f"{x:.3g}"


def table(links: list[Link], slow_hosts: list[str], slow_links: list[Link]) -> list[str]:
    """One line per ring link: `host1 -> host2: 9.12 Gbit/s, 48 us`, marked where slow."""
    rows = []
    for ln in links:
        mark = " (slow)" if ln in slow_links or ln.src in slow_hosts or ln.dst in slow_hosts else ""
        rows.append(f"{ln.src} -> {ln.dst}: {gbit(ln.gbit_s)} Gbit/s, {ln.latency_us:.0f} us{mark}")
    return rows


def busbw_text(busbw: dict[str, float], slowest: Link) -> str:
    """'allreduce busbw 0.091 Gbit/s (mpi4py) = 0.95 x the slowest link' from the collectives' GB/s figures."""
    if not busbw:
        return ""
    lib, gb_s = max(busbw.items(), key=lambda kv: kv[1])
    rate = gb_s * 8
    ratio = f" = {rate / slowest.gbit_s:.2f} x the slowest link" if slowest.gbit_s > 0 else ""
    return f"; allreduce busbw {gbit(rate)} Gbit/s ({lib}){ratio}"


def verdict(links: list[Link], busbw: dict[str, float] | None = None,
            fraction: float = SLOW_FRACTION) -> tuple[Outcome, dict]:
    """The check's line from the measured links, and what --json carries (the table included)."""
    slow_hosts, slow_links = assess(links, fraction)
    slowest = min(links, key=lambda ln: ln.gbit_s)
    median = statistics.median(ln.gbit_s for ln in links)
    lats = [ln.latency_us for ln in links]
    hosts = len({h for ln in links for h in (ln.src, ln.dst)})
    rates = f"{gbit(slowest.gbit_s)}-{gbit(max(ln.gbit_s for ln in links))}"
    lat = f"{min(lats):.0f}" + (f"-{max(lats):.0f}" if f"{min(lats):.0f}" != f"{max(lats):.0f}" else "")
    summary = (f"{len(links)} ring links between {hosts} nodes: {rates} Gbit/s, latency {lat} us, slowest "
               f"{slowest.src} -> {slowest.dst} {gbit(slowest.gbit_s)} Gbit/s"
               f"{busbw_text(busbw or {}, slowest)}")
    data = {"links": [asdict(ln) for ln in links], "slowest": asdict(slowest), "median_gbit_s": median,
            "slow_hosts": slow_hosts, "slow_links": [f"{ln.src} -> {ln.dst}" for ln in slow_links]}
    if busbw:
        lib, gb_s = max(busbw.items(), key=lambda kv: kv[1])
        data.update(allreduce_busbw_gbit_s=gb_s * 8, allreduce_lib=lib,
                    allreduce_vs_slowest=gb_s * 8 / slowest.gbit_s if slowest.gbit_s > 0 else None)
    data["table"] = table(links, slow_hosts, slow_links)
    if slow_hosts:
        names = ", ".join(slow_hosts)
        worst = max(ln.gbit_s for ln in links if ln.src in slow_hosts or ln.dst in slow_hosts)
        others = statistics.median(ln.gbit_s for ln in links if ln.src not in slow_hosts and ln.dst not in
                                   slow_hosts) if len(slow_hosts) * 2 < len(links) else median
        found = (f"slow node{'s' * (len(slow_hosts) > 1)} {names}: {'its' if len(slow_hosts) == 1 else 'their'} "
                 f"links at most {gbit(worst)} Gbit/s, "
                 f"{worst / others:.2g} x the others' {gbit(others)} Gbit/s; {summary}")
        it = "it" if len(slow_hosts) == 1 else "them"
        fix = (f"check {names}'s NIC and link speed (ethtool), cabling and switch port, or leave {it} out of the "
               f"job: sbatch/srun --exclude={','.join(slow_hosts)} (mpirun: drop {it} from -H)")
        return ("WARN", found, fix), data
    if slow_links:
        paths = ", ".join(f"{ln.src} -> {ln.dst}" for ln in slow_links)
        found = f"slow link {paths} ({gbit(slow_links[0].gbit_s)} Gbit/s) between fast nodes; {summary}"
        return ("WARN", found, "check the cabling and switch ports on that path between the two nodes"), data
    return ("PASS", summary, None), data


# --- the measurement (mpi4py, numpy) ------------------------------------------------------------------------


def quiet_barrier(comm) -> None:
    """A barrier that sleeps while it waits: a rank with nothing to measure leaves the cores to those that do."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def allgather_names(comm, name: str) -> list[str]:
    """Every rank's `name`, through a fixed-size buffer (a buffer call: the deadline can still fire)."""
    import numpy as np
    mine = np.zeros(NAME_BYTES, dtype=np.uint8)
    raw = name.encode()[:NAME_BYTES]
    mine[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    every = np.zeros((comm.Get_size(), NAME_BYTES), dtype=np.uint8)
    comm.Allgather(mine, every)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every]


def send_side(comm, peer: int, nbytes: int) -> tuple[float, float, int]:
    """The sending end of one link: (Gbit/s, one-way latency in us, message bytes)."""
    import numpy as np
    small, ctrl = np.zeros(1, dtype=np.float64), np.zeros(1, dtype=np.int64)
    rtts = []
    for i in range(LATENCY_WARMUP + LATENCY_ROUNDS):
        t0 = time.perf_counter()
        comm.Send(small, dest=peer, tag=TAG)
        comm.Recv(small, source=peer, tag=TAG)
        if i >= LATENCY_WARMUP:
            rtts.append(time.perf_counter() - t0)
    buf, ack = np.zeros(max(nbytes, PROBE_BYTES), dtype=np.uint8), np.zeros(1, dtype=np.uint8)

    def timed(size: int) -> float:
        ctrl[0] = size
        comm.Send(ctrl, dest=peer, tag=TAG)
        t0 = time.perf_counter()
        comm.Send(buf[:size], dest=peer, tag=TAG)
        comm.Recv(ack, source=peer, tag=TAG)
        return time.perf_counter() - t0

    probe = min(PROBE_BYTES, nbytes)
    size = max(probe, min(nbytes, int(probe / timed(probe) * MESSAGE_S)))
    rates, start = [], time.perf_counter()
    while len(rates) < REPEATS and (not rates or time.perf_counter() - start < LINK_BUDGET_S):
        rates.append(size * 8 / timed(size) / 1e9)
    ctrl[0] = 0
    comm.Send(ctrl, dest=peer, tag=TAG)
    return max(rates), statistics.median(rtts) / 2 * 1e6, size


def receive_side(comm, peer: int, nbytes: int) -> None:
    import numpy as np
    small, ctrl = np.zeros(1, dtype=np.float64), np.zeros(1, dtype=np.int64)
    for _ in range(LATENCY_WARMUP + LATENCY_ROUNDS):
        comm.Recv(small, source=peer, tag=TAG)
        comm.Send(small, dest=peer, tag=TAG)
    buf, ack = np.empty(max(nbytes, PROBE_BYTES), dtype=np.uint8), np.zeros(1, dtype=np.uint8)
    while True:
        comm.Recv(ctrl, source=peer, tag=TAG)
        if ctrl[0] == 0:
            return
        comm.Recv(buf[:int(ctrl[0])], source=peer, tag=TAG)
        comm.Send(ack, dest=peer, tag=TAG)


def measure(comm, hosts: list[str], names: list[str], nbytes: int) -> list[Link]:
    """Every ring link between the hosts of `hosts` (each rank's host, by rank), on every rank alike."""
    import numpy as np
    leaders = list(dict.fromkeys(hosts))  # one rank per host: the lowest, hosts in rank order
    ranks = [hosts.index(h) for h in leaders]
    links, me = ring(len(ranks)), comm.Get_rank()
    figures = np.zeros((len(links), 3), dtype=np.float64)  # Gbit/s, us, bytes: the sender's row
    for group in phases(links):
        for k in group:
            src, dst = ranks[links[k][0]], ranks[links[k][1]]
            if me == src:
                figures[k] = send_side(comm, dst, nbytes)
            elif me == dst:
                receive_side(comm, src, nbytes)
        quiet_barrier(comm)
    comm.Allreduce(np.copy(figures), figures)  # MPI.SUM by default: each row filled by its sender alone
    return [Link(names[ranks[a]], names[ranks[b]], float(f[0]), float(f[1]), int(f[2]))
            for (a, b), f in zip(links, figures)]


def mpi_connects(ctx: Context) -> str | None:
    """`when` of the network check: mpi4py carries the point-to-point messages."""
    if "mpi4py" in ctx.spans:
        return None
    reason = "not an MPI launch" if ctx.cluster.launcher in NOT_MPI else "see ranks"
    return f"mpi4py does not connect the {ctx.cluster.size} launched ranks ({reason}): no link measured"


@check("network", order=125, min_ranks=2, alone=ALONE, when=mpi_connects, error_fix=NETWORK_FIX)
def network(ctx: Context) -> Outcome:
    c, comm = ctx.cluster, ctx.comm
    hosts = allgather_names(comm, socket.gethostname())  # the machine: same host = memory, not a link
    names = allgather_names(comm, c.node_name or c.hostname or socket.gethostname())  # what the user calls it
    if len(set(hosts)) < 2:
        return "SKIP", f"all {c.size} ranks on one host: no link between nodes to measure " \
                       f"(launch across 2+ nodes: srun -N 2 ..., mpirun -H node1:1,node2:1 ...)", None
    if ctx.hvd is not None:  # its checks are done; the gather and the verdict go over mpi4py (spans it)
        ctx.hvd.shutdown()  # its background thread polls MPI: beside it a round trip can take ms, not us
        ctx.hvd = None
        ctx.spans.discard("horovod")
    links = measure(comm, hosts, names, ctx.args.bytes)
    outcome, data = verdict(links, ctx.facts.get("busbw"))
    ctx.facts.setdefault("tables", {})["network"] = data["table"]
    ctx.facts.setdefault("json", {})["network"] = data
    return outcome
