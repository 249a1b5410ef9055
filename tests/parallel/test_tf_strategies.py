"""tf.distribute backends for real: MirroredStrategy over 2 logical CPU devices in one process, and
MultiWorkerMirroredStrategy over 2 worker processes started by mpirun and by a TF_CONFIG written by hand.
Weights equal one device's full-batch training on the union of every replica's batches, identical on every
worker; rank 0's weights and optimizer slots reach every worker; BatchNorm copies synced."""
import json
import socket
import subprocess

from tests.launch import ROOT, command, env, run
from tests.parallel.test_multirank import _ok_lines

WORKER = "tests/parallel/worker_tf_strategy.py"


def check(res: dict, workers: int, local: int, launcher: str) -> None:
    for r in res.values():
        assert (r["size"], r["launcher"]) == (workers, launcher)
        got = {v["variant"]: v for v in r["results"]}
        assert set(got) == {"plain", "accumulate2", "resnet18_batchnorm"}
        assert all(v["replicas"] == 2 and v["local_replicas"] == local for v in got.values())
        assert got["plain"]["diff_vs_single_device"] < 1e-6
        assert got["accumulate2"]["diff_vs_single_device"] < 1e-6
        assert all(v["spread"] == 0.0 for v in got.values())
        assert got["resnet18_batchnorm"]["bn_local_spread_after"] == 0.0


def test_mirrored_two_cpu_devices_match_one_device():
    res = _ok_lines(run("single", 1, [WORKER, "mirrored"], timeout=300), 1)
    check(res, 1, 2, "single")
    # the two replicas' BatchNorm copies really were updated apart (so the sync is what made them equal)
    assert res[0]["results"][2]["bn_local_spread_before"] > 0


def test_multiworker_under_mpirun_matches_one_device():
    res = _ok_lines(run("mpirun", 2, [WORKER, "multiworker"], timeout=300), 2)
    check(res, 2, 1, "openmpi")
    assert all(r["collective"] == "RING" for r in res.values())


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multiworker_under_a_hand_written_tf_config():
    workers = [f"localhost:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        e = env()
        e["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen(command("single", 1, [WORKER, "multiworker"]), cwd=ROOT, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    merged = subprocess.CompletedProcess([], max(p.returncode for p in procs), "".join(outs), "")
    check(_ok_lines(merged, 2), 2, 1, "tf-config")


