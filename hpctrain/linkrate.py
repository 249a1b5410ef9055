"""Which rank sits behind a slow link, from the kernel's own accounting of each of its TCP connections. Linux,
stdlib only, framework-neutral.

A slow link does not show in step times: in synchronous training every rank waits for it alike (hpctrain.stragglers
names a slow *computer*, not a slow link). What differs is what each rank's own connections achieve. For every TCP
connection the kernel counts the bytes the peer acknowledged (`tcpi_bytes_acked`) and the time data was in flight
(`tcpi_busy_time`); over a log window their quotient is the rate the connection moved data at while it had data
to move, whatever library opened it (Open MPI, Gloo, gRPC). Each rank reports the FASTEST of its connections to
other hosts that moved at least MIN_BYTES in the window: a rank on a host whose link is slow has no fast connection
at all, while a rank whose peer is slow still has a fast one to another peer. The figure travels in the window's one
reduction (no extra collective), and rank 0 names a rank whose fastest connection stayed far below the other ranks'
median. Where every rank exchanges with the slow host only (a star whose centre is slow, or two ranks), no rank
stands out and nothing is named; the doctor's network check measures each pair.
"""
from __future__ import annotations

import ipaddress
import math
import os
import socket
import statistics
import struct

from hpctrain.stragglers import RankWatch

FACTOR = 10.0            # the fastest connection this many times below the other ranks' median: a slow link
MIN_BYTES = 1 << 20      # a connection counts once it moved this much in the window (not control messages alone)
TCP_INFO_BYTES = 232
_ACKED = struct.Struct("=Q")   # tcpi_bytes_acked, at offset 120 (Linux >= 4.1)
_ACKED_AT = 120
_BUSY = struct.Struct("=Q")    # tcpi_busy_time, microseconds with data in flight, at offset 168 (Linux >= 4.10);
_BUSY_AT = 168                 # counted in clock ticks (1-10 ms), so only a window of many exchanges has a figure


def _remote(local: str, peer: str) -> bool:
    """A connection to another host: not loopback, not this host's own address."""
    try:
        return peer != local and not ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def _tcp_info(s: socket.socket) -> tuple[int, int] | None:
    """(bytes acknowledged, microseconds busy) of a connected TCP socket to another host; None for anything else."""
    if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
        return None
    if not _remote(s.getsockname()[0], s.getpeername()[0]):
        return None
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    if len(info) < _BUSY_AT + _BUSY.size:
        return None
    return _ACKED.unpack_from(info, _ACKED_AT)[0], _BUSY.unpack_from(info, _BUSY_AT)[0]


def connections() -> dict[tuple, tuple[int, int]]:
    """This process's TCP connections to other hosts: (fd, local, peer) -> (bytes acknowledged, microseconds busy),
    read with getsockopt(TCP_INFO) on a duplicate of each socket descriptor."""
    found = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue
        try:
            counters = _tcp_info(s)
            if counters is not None:
                found[(int(name), s.getsockname()[0], s.getpeername()[0])] = counters
        except OSError:
            continue  # not connected, or closed meanwhile
        finally:
            s.close()  # the duplicate only
    return found


class Sampler:
    """`take()` once a log window: the fastest rate (bits/s) at which any connection to another host moved data in
    the window (bytes acknowledged per second with data in flight); NaN when none moved MIN_BYTES."""

    def __init__(self):
        self.last = connections()

    def take(self) -> float:
        now, best = connections(), math.nan
        for key, (acked, busy) in now.items():
            before_acked, before_busy = self.last.get(key, (0, 0))
            moved, spent = acked - before_acked, busy - before_busy
            if moved >= MIN_BYTES and spent > 0:
                rate = 8 * moved / (spent / 1e6)
                best = rate if math.isnan(best) else max(best, rate)
        self.last = now
        return best


def slowest(fastest: list[float]) -> tuple[int, float, float] | None:
    """(rank, its fastest rate, the other ranks' median) for a rank behind a slow link; None when there is none.
    Ranks that measured nothing (NaN) are left out."""
    ranks = {r: v for r, v in enumerate(fastest) if math.isfinite(v) and v > 0}
    if len(ranks) < 3:  # two ranks share their one link: either end may be the slow one
        return None
    rank = min(ranks, key=ranks.__getitem__)
    median = statistics.median(v for r, v in ranks.items() if r != rank)
    if ranks[rank] * FACTOR < median:
        return rank, ranks[rank], median
    return None


def _rate(bits: float) -> str:
    return f"{bits / 1e9:.3g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.3g} Mbit/s"


class Watch(RankWatch):
    """The slow-link watch (as hpctrain.stragglers.Watch): the fastest connection of each rank."""

    key = "slow_link_rank"

    def measure(self, fastest: list[float]) -> tuple[dict, tuple | None]:
        rates = [v for v in fastest if math.isfinite(v) and v > 0]
        if not rates:
            return {}, None
        return ({"link_mbit_s_min": min(rates) / 1e6, "link_mbit_s_median": statistics.median(rates) / 1e6},
                slowest(fastest))

    def named_line(self, found: tuple, steps: str) -> str:
        rank, mine, median = found
        return (f"slow link: rank {rank} on node {self.nodes[rank]}: its fastest connection to another host delivered "
                f"{_rate(mine)}, 1/{median / mine:.0f} of the other ranks' median {_rate(median)} ({steps}); every "
                "gradient exchange waits for it")

    def gone_line(self, rank: int, steps: str) -> str:
        return f"slow link gone: rank {rank} on node {self.nodes[rank]} delivers like the others again ({steps})"
