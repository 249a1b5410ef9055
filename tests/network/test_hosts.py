"""The launch paths users type, across emulated hosts with a real network (one network per module, see
conftest.py): mpirun and horovodrun over ssh, Horovod Gloo with the interface named, the link rate as
the physical limit, and a link that goes down mid-training."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hpctrain.errors import EXIT_PREEMPTED
from tests.launch import BIN, ROOT, SLOW_FSYNC, env, metrics, trained, wait_for
from tests.network.hosts import Hosts, rate_bits

pytestmark = pytest.mark.network

PY = sys.executable
# Each rank writes the host it runs on before it starts: the proof that ranks ran on different hosts.
WHERE = 'hostname > "$HPXT_WHERE/rank-${OMPI_COMM_WORLD_RANK:-$HOROVOD_RANK}"; exec "$@"'


def host_env(hosts: Hosts, **extra) -> dict:
    e = env()  # venv on PATH, the checkout on PYTHONPATH, root allowed, no inherited launcher identity
    e.update(OMP_NUM_THREADS="1", **extra)
    return e


def mpirun(hosts: Hosts, names: list[str], args: list[str], where: Path | None = None) -> list[str]:
    """What a user on `names[0]` types: one rank per host, over ssh, Open MPI's TCP on the hosts' /24."""
    cmd = hosts.mpirun_prefix(names)
    for var in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", *["HPXT_WHERE"] * bool(where)):
        cmd += ["-x", var]
    wrap = ["bash", "-c", WHERE, "_"] if where else []
    return cmd + wrap + [PY, *args]


def on_host(hosts: Hosts, name: str, cmd: list[str], timeout: float, **extra) -> subprocess.CompletedProcess:
    return hosts.run(name, cmd, cwd=ROOT, env=host_env(hosts, **extra), timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"rc={p.returncode}\n{out[-4000:]}"
    return out


def ranks_ran_on(where: Path) -> dict[int, str]:
    return {int(f.name.split("-")[1]): f.read_text().strip() for f in where.glob("rank-*")}


def test_hosts_have_names_addresses_and_sshd(hosts):
    for src in hosts.names:
        assert hosts.run(src, ["hostname"]).stdout.strip() == src
        for dst in hosts.names:
            p = hosts.ssh(src, dst, "hostname; hostname -i", timeout=20)
            assert p.returncode == 0, p.stderr
            assert p.stdout.split() == [dst, hosts.address[dst]], p.stdout
    # A host sees only its own address on the /24 and loopback: no way around the links.
    addrs = hosts.run("host2", ["ip", "-o", "-4", "addr", "show"]).stdout
    assert re.findall(r"inet (\S+)", addrs) == ["127.0.0.1/8", f"{hosts.address['host2']}/24"]


def test_mpirun_resnet_over_ssh_ranks_on_two_hosts_gradients_cross_the_link(hosts, tmp_path):
    where, run_dir, steps = tmp_path / "where", tmp_path / "run", 3
    where.mkdir()
    before = hosts.counters("host2")
    p = on_host(hosts, "host1", mpirun(hosts, ["host1", "host2"], [
        "-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--max-steps", str(steps),
        "--run-dir", str(run_dir), "--tensorboard", "false"], where=where), timeout=150, HPXT_WHERE=str(where))
    out = ok(p)
    assert ranks_ran_on(where) == {0: "host1", 1: "host2"}, out[-2000:]
    after = hosts.counters("host2")
    records = metrics(run_dir, "train")
    assert records and records[-1]["step"] == steps
    handed = sum(r.get("sent_bytes", 0) for r in records)  # per rank, to the gradient allreduce
    assert handed > 10e6, records[-1]
    # A 2-rank ring allreduce sends about the buffer size each way: the gradients went through host2's eth0.
    for way in ("tx", "rx"):
        assert after[way] - before[way] >= 0.9 * handed, (way, before, after, handed)


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_doctor_under_a_launcher_reports_both_hosts(hosts, tmp_path, launcher):
    # horovodrun tags every chunk of a rank's output ("[1,0]<stdout>:"), also inside a long line: the document
    # is read from --json-file there
    doctor = ["-m", "hpctrain.doctor", "--bytes", str(1 << 20), "--timeout", "60",
              "--run-dir", str(tmp_path / "doctor"), "--json-file", str(tmp_path / "doctor.json")]
    cmd = (mpirun if launcher == "mpirun" else horovodrun)(hosts, ["host1", "host2"], doctor)
    p = on_host(hosts, "host1", cmd, timeout=150)
    assert "PASS" in p.stdout and "launch:" in p.stdout, f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["ranks"] == 2, p.stdout[-2000:]
    assert "-H host1:1,host2:1" in report["launch"], report["launch"]
    failed = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert not failed and p.returncode == 0, (failed, p.stderr[-2000:])
    network = next(c for c in report["checks"] if c["name"] == "network")
    assert network["status"] == "PASS" and "host1" in str(report["network"]["table"]), network


def horovodrun(hosts: Hosts, names: list[str], args: list[str], gloo: bool = False,
               where: Path | None = None, slots: int = 1) -> list[str]:
    cmd = [str(BIN / "horovodrun"), "-np", str(slots * len(names)), "-H", hosts.hostlist(names, slots),
           "--ssh-port", "22",
           "--ssh-identity-file", str(hosts.ssh_key), "--start-timeout", "60"]
    # The interface named: horovodrun hands it to Open MPI (btl/oob_tcp_if_include) or to Gloo (HOROVOD_GLOO_IFACE).
    cmd += ["--gloo"] * gloo + ["--network-interface", "eth0"]
    wrap = ["bash", "-c", WHERE, "_"] if where else []
    return cmd + wrap + [PY, *args]


BERT = ["-m", "hpctrain.bert", "--config", "configs/bert_tiny.toml", "--max-steps", "2", "--batch-size", "8",
        "--seq-len", "64", "--tensorboard", "false", "--progress", "never"]


def test_horovodrun_bert_over_ssh_two_ranks_per_host(hosts, tmp_path):
    # horovodrun -np 4 -H host1:2,host2:2: ranks fill hosts in order; the one start line counts 4 ranks on 2 nodes.
    where = tmp_path / "where"
    where.mkdir()
    p = on_host(hosts, "host1", horovodrun(hosts, ["host1", "host2"], [*BERT, "--run-dir", str(tmp_path / "run")],
                                           where=where, slots=2), timeout=240, HPXT_WHERE=str(where))
    out = ok(p)
    assert ranks_ran_on(where) == {0: "host1", 1: "host1", 2: "host2", 3: "host2"}, out[-2000:]
    assert "4 rank(s) on 2 node(s)" in out, out[-2000:]
    assert metrics(tmp_path / "run", "train")[-1]["step"] == 2


def test_horovodrun_gloo_interface_named_launched_on_a_host(hosts, tmp_path):
    where = tmp_path / "where"
    where.mkdir()
    before = hosts.counters("host2")
    p = on_host(hosts, "host1", horovodrun(hosts, ["host1", "host2"], [
        "-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--max-steps", "2",
        "--run-dir", str(tmp_path / "run"), "--tensorboard", "false"], gloo=True, where=where),
        timeout=150, HPXT_WHERE=str(where))
    out = ok(p)
    assert ranks_ran_on(where) == {0: "host1", 1: "host2"}, out[-2000:]
    handed = sum(r.get("sent_bytes", 0) for r in metrics(tmp_path / "run", "train"))
    assert hosts.counters("host2")["tx"] - before["tx"] >= 0.9 * handed > 0


def test_tf_multiworker_tf_config_with_host_names(hosts, tmp_path):
    """TF's own launch: one process per host, each with a TF_CONFIG naming the hosts; worker 1 started over ssh."""
    run_dir, steps = tmp_path / "run", 2
    workers = [f"{name}:{23456 + i}" for i, name in enumerate(["host1", "host2"])]
    args = [PY, "-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--framework", "tf", "--backend",
            "multiworker", "--max-steps", str(steps), "--run-dir", str(run_dir), "--tensorboard", "false"]
    e = host_env(hosts)

    def conf(i):
        return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
    remote = " ".join(["cd", str(ROOT), "&&", "env", *(f"{k}={shlex.quote(e[k])}" for k in ("PATH", "PYTHONPATH")),
                       f"TF_CONFIG={shlex.quote(conf(1))}", "OMP_NUM_THREADS=1", *map(shlex.quote, args)])
    before = hosts.counters("host2")
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    with open(logs[0], "w") as f0, open(logs[1], "w") as f1:
        jobs = [hosts.popen("host1", args, cwd=ROOT, env={**e, "TF_CONFIG": conf(0)}, stdout=f0, stderr=f0),
                hosts.popen("host1", ["ssh", "-F", str(hosts.ssh_config_file), "host2", remote], cwd=ROOT, env=e,
                            stdout=f1, stderr=f1)]
    try:
        codes = [job.wait(timeout=240) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    assert "tf-config launcher, 2 rank(s) on 2 node(s)" in logs[0].read_text()
    assert metrics(run_dir, "train")[-1]["step"] == steps
    # resnet18's 11.2 M float32 gradients are 44.7 MB a step: TF's ring sends about that each way.
    assert hosts.counters("host2")["tx"] - before["tx"] >= steps * 40e6


PROBE = r"""
import socket, sys, time
if sys.argv[1] == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); n = 0; t0 = None
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        if t0 is None:
            t0 = time.monotonic()
        else:
            n += len(b)
    print(n * 8 / (time.monotonic() - t0), flush=True)
else:
    c = socket.create_connection((sys.argv[2], int(sys.argv[3]))); buf = b"x" * (1 << 16)
    t0 = time.monotonic()
    while time.monotonic() - t0 < float(sys.argv[4]):
        c.sendall(buf)
    c.close()
"""


def stream_bits_per_s(hosts: Hosts, src: str, dst: str, seconds: float = 2.0) -> float:
    """A TCP stream from `src` to `dst` for `seconds`: bits per second the receiver got."""
    rx = hosts.popen(dst, [PY, "-c", PROBE, "recv", "5201"], stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        hosts.run(src, [PY, "-c", PROBE, "send", dst, "5201", str(seconds)], check=True, timeout=seconds + 30)
        out, _ = rx.communicate(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return float(out.strip())


def test_link_rate_is_the_physical_limit(hosts):
    for name in ("host1", "host2"):
        hosts.set_rate(name, "1gbit")
    try:
        fast = stream_bits_per_s(hosts, "host1", "host2")
        slow = stream_bits_per_s(hosts, "host1", "host3")
    finally:
        for name in ("host1", "host2"):
            hosts.set_rate(name, "10gbit")
    print(f"\nTCP stream host1->host2 {fast / 1e9:.3f} Gbit/s at a 1gbit link, host1->host3 {slow / 1e9:.3f} "
          f"Gbit/s at {hosts.rate['host3']}", file=sys.stderr)
    assert 0.70 <= fast / rate_bits("1gbit") <= 1.05, fast
    assert 0.70 <= slow / rate_bits(hosts.rate["host3"]) <= 1.05, slow
    assert 6 <= fast / slow <= 14, (fast, slow)


def sha256_ok(path: Path) -> bool:
    side = path.with_name(path.name + ".sha256")
    return side.exists() and side.read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()


def reconnect_and_end(hosts, host, job) -> None:
    """After a link test, pass or fail: the link back up, the job gone."""
    hosts.link_up(host)
    if job.poll() is None:
        job.kill()
        job.wait()


def test_link_down_mid_training_ends_with_the_hang_code_checkpoints_intact(hosts, tmp_path):
    run_dir, timeout = tmp_path / "run", 6
    args = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--synthetic-size", "960", "--run-dir",
            str(run_dir), "--tensorboard", "false", "--checkpoint-every", "20", "--hang-timeout", str(timeout),
            "--startup-timeout", "60"]
    # The link goes down a step after the checkpoint of step 20, mid-training: a checkpoint's phase (the next at step
    # 40) may wait PHASE_FACTOR x the timeout, and the kernel's TCP timeout would end the job first (Open MPI, 255).
    # Node tuning a site needs for mpirun over ssh: with Linux's default (15 retransmissions, ~15 min) mpirun
    # keeps waiting for the lost host's daemon after the healthy rank exited 86; 5 gives up after ~13 s.
    for name in hosts.names:
        hosts.sysctl(name, "net.ipv4.tcp_retries2", 5)
    log = tmp_path / "job.log"
    with open(log, "w") as f:  # a file, not a pipe: an ssh to the lost host may hold a pipe open after mpirun ends
        job = hosts.popen("host1", mpirun(hosts, ["host1", "host2"], [*args, "--max-steps", "60"]), cwd=ROOT,
                          env=host_env(hosts), stdout=f, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: trained(run_dir, 21) or job.poll() is not None, 150), "no 21 steps in 150 s"
        assert job.poll() is None, log.read_text()[-3000:]
        hosts.link_down("host2")
        down = time.monotonic()
        job.wait(timeout=timeout * 6 + 60)
        ended = time.monotonic() - down
    finally:
        reconnect_and_end(hosts, "host2", job)
    out = log.read_text()
    hang = [line for line in out.splitlines() if "no progress for" in line]
    print(f"\nlink down -> job ended in {ended:.1f} s, rc={job.returncode}: {hang[:1]}", file=sys.stderr)
    assert job.returncode == 86, out[-3000:]
    # One line naming the rank, its host and what it waited for (the step after the last one done).
    assert hang and re.search(r"rank \d on node host[12]: no progress for \d+ s after step \d+", hang[0]), hang
    fired = [json.loads(f.read_text()) for f in run_dir.glob("hang-*.json")]
    assert fired and ended <= min(r["limit"] for r in fired) + 30, (ended, fired)
    status = json.loads((run_dir / "run.json").read_text())["status"]
    assert status["exit_code"] == 86 and status["state"] == "failed", status
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts and all(sha256_ok(c) for c in ckpts), ckpts
    assert not list(run_dir.glob("**/.ckpt-*.tmp"))
    last = int(ckpts[-1].name.split("-")[1].split(".")[0])

    # The link is back: the same command resumes from the newest checkpoint, across the same two hosts.
    p = on_host(hosts, "host1", mpirun(hosts, ["host1", "host2"], [*args, "--max-steps", str(last + 2)]),
                timeout=150)
    ok(p)
    steps = [r["step"] for r in metrics(run_dir, "train")]
    assert steps[-3:] == [last, last + 1, last + 2] or steps[-2:] == [last + 1, last + 2], steps


def test_link_flap_training_goes_on_without_a_false_alarm(hosts, tmp_path):
    run_dir, steps = tmp_path / "run", 12
    args = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--synthetic-size", "960", "--max-steps",
            str(steps), "--run-dir", str(run_dir), "--tensorboard", "false", "--hang-timeout", "20"]
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        job = hosts.popen("host1", mpirun(hosts, ["host1", "host2"], args), cwd=ROOT, env=host_env(hosts), stdout=f,
                          stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: trained(run_dir, 3) or job.poll() is not None, 150), "no 3 steps in 150 s"
        hosts.link_down("host2")
        down = time.time()
        time.sleep(3)
        hosts.link_up("host2")
        job.wait(timeout=150)
    finally:
        reconnect_and_end(hosts, "host2", job)
    out = log.read_text()
    assert job.returncode == 0, out[-3000:]
    records = metrics(run_dir, "train")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # The flap was felt: the step that spanned it waited for the link (at least its 3 s down).
    spanning = [b["time"] - a["time"] for a, b in zip(records, records[1:]) if a["time"] <= down + 3 <= b["time"]]
    assert spanning and spanning[0] >= 2.5, [r["time"] - down for r in records]
    print(f"\nlink flap 3 s: the step across it took {spanning[0]:.1f} s, training went on", file=sys.stderr)
    assert "no progress" not in out and "was stopped" not in out and not list(run_dir.glob("hang-*"))


def test_preempted_across_hosts_with_a_slow_checkpoint_nothing_lost(hosts, tmp_path):
    """USR1 to the ranks on both hosts (as `scancel --signal=USR1` delivers it to every task; not through mpirun,
    which would signal rank 0's strace instead of its Python): they agree on a step, rank 0 saves while every
    fsync() takes 2.5 s (a slow cluster file system), and only then does the job exit 85; the same command resumes
    at the next step across the same hosts."""
    run_dir = tmp_path / "run"
    args = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--synthetic-size", "4096", "--run-dir",
            str(run_dir), "--tensorboard", "false", "--preempt-check-every", "2", "--eval-every-epoch", "false"]
    cmd = mpirun(hosts, ["host1", "host2"], args)
    at = cmd.index(PY)
    cmd[at:at] = ["bash", "-c", SLOW_FSYNC, "_"]
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        job = hosts.popen("host1", cmd, cwd=ROOT, env=host_env(hosts), stdout=f, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: trained(run_dir, 2) or job.poll() is not None, 150), "no 2 steps in 150 s"
        assert job.poll() is None, log.read_text()[-3000:]
        signalled = time.monotonic()
        ranks = [p for p in psutil.process_iter(["name", "cmdline"]) if (p.info["name"] or "").startswith("python")
                 and str(run_dir) in " ".join(p.info["cmdline"] or [])]
        assert len(ranks) == 2, ranks
        for p in ranks:
            p.send_signal(signal.SIGUSR1)
        job.wait(timeout=120)
        took = time.monotonic() - signalled
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    out = log.read_text()
    assert job.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = metrics(run_dir, "train")[-1]["step"]
    ckpt = run_dir / "checkpoints" / f"ckpt-{stopped:08d}.pt"
    assert ckpt.exists() and sha256_ok(ckpt), f"checkpoint of step {stopped} lost\n{out[-3000:]}"
    assert f"stopped at step {stopped} on SIGUSR1, checkpoint saved" in out, out[-3000:]
    assert took >= 2.5 and not list(ckpt.parent.glob(".*.tmp")), took  # the slow save was waited for
    print(f"\nUSR1 across 2 hosts: stopped at step {stopped}, saved under slow fsync, exit 85 in {took:.1f} s",
          file=sys.stderr)
    p = on_host(hosts, "host1", mpirun(hosts, ["host1", "host2"], [*args, "--max-steps", str(stopped + 2)]),
                timeout=150)
    out = ok(p)
    assert f"at step {stopped}" in out and "resumed from" in out, out[-2000:]
    assert [r["step"] for r in metrics(run_dir, "train")][-2:] == [stopped + 1, stopped + 2]


def test_slow_host_mid_run_named_by_rank_0(hosts, tmp_path):
    # 3 hosts at 10 Gbit/s; after step 4 host2's link is shaped to 1/100 (100 Mbit/s). The job goes on, and rank 0
    # names host2 from the delivery rates the ranks report in the log windows (hpctrain.linkrate).
    run_dir, steps, slow_after = tmp_path / "run", 12, 4
    args = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--synthetic-size", "960", "--max-steps",
            str(steps), "--log-every", "2", "--run-dir", str(run_dir), "--tensorboard", "false"]
    log = tmp_path / "job.log"
    names = ["host1", "host2", "host3"]
    rates = dict(hosts.rate)
    for name in names:
        hosts.set_rate(name, "10gbit")
    try:
        with open(log, "w") as f:
            job = hosts.popen("host1", mpirun(hosts, names, args), cwd=ROOT, env=host_env(hosts), stdout=f,
                              stderr=subprocess.STDOUT)
        assert wait_for(lambda: trained(run_dir, slow_after) or job.poll() is not None, 150), "no steps in 150 s"
        hosts.set_rate("host2", "100mbit")
        shaped = time.time()
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        for name in names:
            hosts.set_rate(name, rates[name])
    out = log.read_text()
    assert job.returncode == 0, out[-3000:]
    records = metrics(run_dir, "train")
    assert [r["step"] for r in records] == list(range(2, steps + 1, 2))  # a record every 2 steps: it went on
    named = re.findall(r"slow link: rank (\d+) on node (\S+): its fastest connection to another host delivered "
                       r"([\d.]+ [MG]bit/s), 1/(\d+) of the other ranks' median ([\d.]+ [MG]bit/s)", out)
    assert named and named[0][:2] == ("1", "host2") and len(named) == 1, out[-3000:]
    after = [r for r in records if r["time"] > shaped + 1]
    assert after and all(r.get("slow_link_rank") == 1 for r in after[1:]), after
    print(f"\nslow host: host2 shaped to 100 Mbit/s after step {slow_after}: named '{named[0][2]}, 1/{named[0][3]} "
          f"of the median {named[0][4]}'; per window (Mbit/s, fastest connection, slowest rank): "
          f"{[round(r['link_mbit_s_min']) for r in records]}", file=sys.stderr)
