"""The slow-link watch's rule and its measure (hpctrain.linkrate), one process."""
import math
import socket
import threading
import time

from hpctrain import linkrate
from hpctrain.linkrate import Sampler, Watch, slowest

G, M = 1e9, 1e6


def test_the_rank_without_a_fast_connection_is_named():
    # host3's link at 1/100: its fastest connection 0.1 Gbit/s; its peers still reach someone fast.
    assert slowest([12 * G, 9 * G, 0.1 * G, 11 * G]) == (2, 0.1 * G, 11 * G)
    assert slowest([12 * G, 9 * G, 2 * G, 11 * G]) is None  # 1/5.5: within the rule's margin (10x)
    assert slowest([12 * G, 0.1 * G]) is None  # two ranks share one link: either end may be slow
    assert slowest([math.nan, 12 * G, 0.1 * G]) is None  # ranks that measured nothing are left out: two remain
    assert slowest([math.nan, 12 * G, 0.1 * G, 11 * G]) == (2, 0.1 * G, 11.5 * G)


def test_named_in_two_windows_in_a_row_then_gone():
    w = Watch(["host1", "host2", "host3"])
    slow, fine = [20 * G, 80 * M, 18 * G], [20 * G, 15 * G, 18 * G]
    record, line = w.window(slow, 1, 2, quiet=True)
    assert record == {"link_mbit_s_min": 80.0, "link_mbit_s_median": 18000.0, "slow_link_rank": 1} and line is None
    assert w.window(slow, 3, 4) == ({"link_mbit_s_min": 80.0, "link_mbit_s_median": 18000.0, "slow_link_rank": 1},
                                    None)  # once: noise until the next window
    _, line = w.window(slow, 5, 6)
    assert line == ("slow link: rank 1 on node host2: its fastest connection to another host delivered 80 Mbit/s, "
                    "1/238 of the other ranks' median 19 Gbit/s (steps 5..6); every gradient exchange waits for it")
    assert w.window(slow, 7, 8)[1] is None  # said once
    _, line = w.window(fine, 9, 10)
    assert line == "slow link gone: rank 1 on node host2 delivers like the others again (steps 9..10)"
    assert w.window([math.nan, math.nan], 11, 12) == ({}, None)


def test_sampler_rates_a_connection_by_the_bytes_it_moved_per_busy_second(monkeypatch):
    monkeypatch.setattr(linkrate, "_remote", lambda local, peer: True)  # loopback counts here
    server = socket.create_server(("127.0.0.1", 0))
    got = []

    def drain():
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                got.append(len(chunk))

    t = threading.Thread(target=drain)
    t.start()
    with socket.create_connection(server.getsockname()) as c:
        s = Sampler()
        c.sendall(b"x" * 1000)
        deadline = time.monotonic() + 10
        while sum(got) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert math.isnan(s.take())  # less than MIN_BYTES moved: control messages do not count
        # The kernel counts busy time in clock ticks (4 ms at HZ=250): a few MiB over loopback may fit in one tick
        # and read as 0 busy. Keep data in flight for many ticks.
        sent, chunk, until = 1000, b"x" * (4 << 20), time.monotonic() + 0.5
        while time.monotonic() < until:
            c.sendall(chunk)
            sent += len(chunk)
        while sum(got) < sent and time.monotonic() < deadline:  # all of it delivered
            time.sleep(0.01)
        rate = s.take()
        assert math.isnan(s.take())  # nothing moved since
    t.join(timeout=10)
    server.close()
    assert rate > 1e8, rate  # loopback moves well over 100 Mbit/s
