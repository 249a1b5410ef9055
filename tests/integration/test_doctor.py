"""`python -m hpctrain.doctor` as real processes: alone, under `mpirun -np 2`, and with real faults (a
read-only run directory, a launcher whose MPI is not the one mpi4py/Horovod were built with, a rank that never
arrives, a TF_CONFIG that is malformed, not this launch's or whose port is taken, mpirun's 1 s Ctrl-C grace)."""
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from hpctrain.doctor.common import Context
from hpctrain.doctor.registry import REGISTRY, Spec, run_checks
from tests.launch import ROOT, check_ok, command, env

DOCTOR = ["-m", "hpctrain.doctor"]
LINE = re.compile(r"^(PASS|WARN|FAIL|SKIP)  ([a-z0-9 -]+): (.*)$")
ALWAYS = ["python", "torch", "tensorflow", "horovod", "container", "horovod tensorflow", "mpirun", "srun", "ctrl-c",
          "mpi4py", "ranks", "mpi library", "gpus", "tf devices", "tf config", "tf port", "run dir"]
COLLECTIVES = ["horovod allreduce", "horovod broadcast", "mpi4py allreduce", "mpi4py broadcast"]
MISMATCH_FIX = "rebuild with the launcher's MPI module loaded, or launch with that MPI's mpirun / srun --mpi=pmix"
SIGKILL = "OMPI_MCA_odls_base_sigkill_timeout"
needs_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow not installed")


def checks(stdout: str) -> dict:
    """name -> (status, rest of the line); asserts every stdout line is a check, a row of the network check's table
    (indented under it) or the one launch line."""
    found, launches = {}, []
    for line in stdout.splitlines():
        if line.startswith("    ") and "network" in found:
            continue
        if line.startswith("launch: "):
            launches.append(line)
            continue
        m = LINE.match(line)
        assert m, f"unexpected output line: {line!r}\n{stdout}"
        assert m[2] not in found, f"check {m[2]!r} printed twice\n{stdout}"
        found[m[2]] = (m[1], m[3])
    assert len(launches) == 1, stdout
    found["launch"] = ("", launches[0][len("launch: "):])
    return found


def doctor(launcher: str, np: int, *flags: str, timeout: int = 150, unset=(SIGKILL, "TF_CONFIG"),
           **extra_env) -> subprocess.CompletedProcess:
    """The doctor under `launcher`; the variables in `unset` are removed first (a user's Ctrl-C setting, a
    TF_CONFIG of the shell) and Open MPI reads no parameter file: only what the test sets counts."""
    e = {k: v for k, v in env().items() if k not in unset}
    e.update(OMPI_MCA_mca_base_param_files="/dev/null", **extra_env)
    t0 = time.monotonic()
    p = subprocess.run(command(launcher, np, [*DOCTOR, *flags]), cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=timeout)
    print(f"\ndoctor {launcher} -np {np} {' '.join(flags)}: rc {p.returncode} in {time.monotonic() - t0:.1f} s")
    return p


def free_port() -> int:
    with socket.socket() as s:  # free a moment ago
        s.bind(("", 0))
        return s.getsockname()[1]


def tf_config(*workers: str, index: int = 0) -> str:
    return json.dumps({"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}})


def test_single_process_passes_and_json_lists_the_same_checks(tmp_path):
    run_dir = tmp_path / "new" / "run"
    p = doctor("single", 1, "--run-dir", str(run_dir))
    check_ok(p)
    found = checks(p.stdout)
    assert list(found) == [*ALWAYS[:-1], "collectives", "run dir", "launch"], found  # in the registry's order
    assert all(status != "FAIL" for status, _ in found.values()), p.stdout
    assert found["ranks"] == ("PASS", "single launcher, 1 rank(s) on 1 node(s); mpi4py and Horovod agree")
    assert found["collectives"][0] == "SKIP" and "run the doctor under the launcher" in found["collectives"][1]
    assert found["tf config"] == ("SKIP", "TF_CONFIG not set (--backend multiworker builds one per launch)")
    assert found["run dir"][0] == "PASS" and re.search(r"\(\d+ MB/s write\)", found["run dir"][1])
    assert found["launch"][1].endswith("-m hpctrain.resnet")
    assert not (tmp_path / "new").exists()  # the write test leaves nothing behind, not even the directories
    for status, rest in found.values():  # WARN carries a fix, PASS does not
        assert (" -> " in rest) == (status == "WARN"), rest
    assert "absl" not in p.stderr and "cuda" not in p.stderr.lower(), p.stderr  # TF's start-up lines captured

    j = doctor("single", 1, "--run-dir", str(run_dir), "--json", "--json-file", str(tmp_path / "doctor.json"))
    check_ok(j)
    doc = json.loads(j.stdout)
    assert json.loads((tmp_path / "doctor.json").read_text()) == doc  # --json-file: the same document, whole
    assert [c["name"] for c in doc["checks"]] == [n for n in found if n != "launch"]
    assert [c["status"] for c in doc["checks"]] == [s for n, (s, _) in found.items() if n != "launch"]
    assert doc["launch"] == found["launch"][1] and doc["ranks"] == 1
    assert all(set(c) == {"status", "name", "detail", "fix"} for c in doc["checks"])


def test_mpirun_two_ranks_collectives_pass_and_print_once(tmp_path):
    p = doctor("mpirun", 2, "--run-dir", str(tmp_path / "run"), **{SIGKILL: "20"})
    check_ok(p)
    found = checks(p.stdout)  # also asserts: every check printed once, one launch line
    assert set(ALWAYS) | set(COLLECTIVES) <= set(found) and "collectives" not in found, p.stdout
    assert found["ranks"] == ("PASS", "openmpi launcher, 2 rank(s) on 1 node(s); mpi4py and Horovod agree")
    for name in COLLECTIVES:
        status, rest = found[name]
        gbps = float(re.search(r"busbw ([\d.]+) GB/s at 16 MiB", rest)[1])
        assert status == "PASS" and rest.startswith("result correct; busbw") and gbps > 0, (name, rest)
    assert found["ctrl-c"][0] == "PASS" and "20 s (environment)" in found["ctrl-c"][1], found["ctrl-c"]
    assert "; rank 1 (" not in p.stdout  # both ranks found the same: nothing added
    assert found["launch"][1].startswith("mpirun -np 2 ") and found["launch"][1].endswith("-m hpctrain.resnet")
    assert len(p.stdout.splitlines()) == len(found)


@pytest.mark.parametrize("sigkill, entry", [(None, "bert"), ("20", "resnet")], ids=["unset-bert", "20s-resnet"])
def test_ctrl_c_grace_under_open_mpi_and_the_entry_launch_line(tmp_path, sigkill, entry):
    p = doctor("single", 1, "--run-dir", str(tmp_path / "run"), "--entry", entry,
               **({SIGKILL: sigkill} if sigkill else {}))
    check_ok(p)
    found = checks(p.stdout)
    status, rest = found["ctrl-c"]
    if sigkill is None:
        assert status == "WARN" and rest.startswith("odls_base_sigkill_timeout 1 s (default): on Ctrl-C mpirun "
                                                    "sends SIGCONT, SIGTERM 1 s later"), rest
        assert rest.endswith(f" -> export {SIGKILL}=20 (or `odls_base_sigkill_timeout = 20` in "
                             "~/.openmpi/mca-params.conf) before mpirun/horovodrun"), rest
    else:
        assert status == "PASS" and rest.startswith("odls_base_sigkill_timeout 20 s (environment)"), rest
        assert "WARN  ctrl-c" not in p.stdout
    launch = found["launch"][1]  # horovodrun (over mpirun) where it is on PATH
    assert re.fullmatch(rf"(mpirun|horovodrun) -np 2 .*python\S* -m hpctrain\.{entry}", launch), launch


@needs_tf
def test_tf_checks_with_a_valid_tf_config(tmp_path):
    p = doctor("single", 1, "--run-dir", str(tmp_path / "run"), TF_CONFIG=tf_config(f"localhost:{free_port()}"))
    check_ok(p)
    found = checks(p.stdout)
    assert found["horovod tensorflow"][0] == "PASS", found["horovod tensorflow"]
    assert found["horovod tensorflow"][1].startswith("TensorFlow ops built with MPI yes")
    assert found["tf devices"][0] == "PASS" and "visible to TensorFlow" in found["tf devices"][1]
    assert found["tf config"] == ("PASS", "0 chief(s) and 1 worker(s) on 1 host(s); each process's task is its "
                                          "rank in the tf-config launch")
    assert found["tf port"] == ("PASS", "this task's TF_CONFIG port is free here")
    assert found["ranks"][0] == "PASS" and found["ranks"][1].startswith("tf-config launcher, 1 rank(s)")
    assert found["ctrl-c"][0] == "SKIP"  # tf.distribute's own launch: no mpirun in between
    assert found["launch"][1].endswith("-m hpctrain.resnet --framework tf --backend multiworker")


@needs_tf
@pytest.mark.parametrize("case", ["taken-port", "task-out-of-range", "one-tf-config-for-two-ranks"])
def test_broken_tf_config_fails_naming_what(tmp_path, case):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        if case == "taken-port":
            p = doctor("single", 1, "--run-dir", str(tmp_path), TF_CONFIG=tf_config(f"localhost:{port}"))
        elif case == "task-out-of-range":
            p = doctor("single", 1, "--run-dir", str(tmp_path), TF_CONFIG=tf_config("a:1", "b:2", index=2))
        else:
            workers = [f"localhost:{free_port()}" for _ in range(2)]
            p = doctor("mpirun", 2, "--run-dir", str(tmp_path), TF_CONFIG=tf_config(*workers))
    assert p.returncode == 1, p.stdout + p.stderr
    found = checks(p.stdout)
    fails = [n for n, (s, _) in found.items() if s == "FAIL"]
    status, rest = found["tf port" if case == "taken-port" else "tf config"]
    if case == "taken-port":
        assert fails == ["tf port"] and rest.startswith(f"port {port} of worker 0 (localhost) is already in use"), rest
        assert f" -> stop what listens there (ss -ltnp 'sport = :{port}')" in rest
    elif case == "task-out-of-range":  # the launch falls back to one process; the tf config line says why
        assert fails == ["tf config"] and "launcher" not in found, p.stdout
        assert rest.startswith("TF_CONFIG: task {'type': 'worker', 'index': 2} is not one of the cluster's 0 chief(s) "
                               "and 2 worker(s)"), rest
        assert found["tf port"] == ("SKIP", "no usable TF_CONFIG (see tf config)")
    else:  # rank 0's task is rank 0: it passes; rank 1's is not, and its line is added
        assert fails == ["tf config"], p.stdout
        assert "; rank 1 (" in rest and "FAIL TF_CONFIG: task is rank 0 of 2, but the launcher (openmpi) started " \
            "rank 1 of 2" in rest, rest
    assert " -> " in rest and "Traceback" not in p.stderr


def _read_only_dir(tmp_path):
    # As root, permissions stop nothing: a read-only tmpfs does.
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    return target / "run", "[Errno 30] Read-only file system", lambda: subprocess.run(
        ["umount", str(target)], capture_output=True, timeout=30)


def _below_a_file(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file" / "run", "[Errno 20] Not a directory", lambda: None


@pytest.mark.parametrize("make", [_read_only_dir, _below_a_file], ids=["read-only-mount", "below-a-file"])
def test_unwritable_run_dir_fails_with_the_os_error_and_a_fix(tmp_path, make):
    run_dir, os_error, cleanup = make(tmp_path)
    try:
        p = doctor("single", 1, "--run-dir", str(run_dir))
    finally:
        cleanup()
    assert p.returncode == 1, p.stdout + p.stderr
    found = checks(p.stdout)
    status, rest = found["run dir"]
    assert status == "FAIL" and f"{run_dir}: {os_error}" in rest and "(while creating the directory)" in rest, rest
    assert " -> pick a --run-dir this user can write" in rest
    assert [n for n, (s, _) in found.items() if s == "FAIL"] == ["run dir"], p.stdout
    assert "Traceback" not in p.stderr


def test_launcher_with_another_mpi_fails_with_the_rebuild_fix(tmp_path):
    # What an MPICH/Intel MPI launcher sets for rank 0 of 2: hpctrain.cluster sees 2 ranks, while Open
    # MPI's mpi4py (and Horovod) start as a singleton of size 1.
    p = doctor("single", 1, "--run-dir", str(tmp_path / "run"), PMI_RANK="0", PMI_SIZE="2", MPI_LOCALRANKID="0",
               MPI_LOCALNRANKS="2")
    assert p.returncode == 1, p.stdout + p.stderr
    found = checks(p.stdout)
    status, rest = found["ranks"]
    assert status == "FAIL", p.stdout
    assert "pmi launcher disagrees: launcher rank 0 of 2, mpi4py rank 0 of 1, Horovod rank 0 of 1" in rest
    assert rest.endswith(f" -> mpi4py/Horovod are built against a different MPI than the one that launched this "
                         f"job: {MISMATCH_FIX}")
    assert all(found[n][0] == "SKIP" for n in COLLECTIVES), p.stdout  # no collective with a missing peer: no hang
    assert "Traceback" not in p.stderr


def test_a_rank_that_never_arrives_is_a_fail_line_not_a_hang():
    # MPMD: rank 1 starts MPI and then sleeps instead of running the doctor; rank 0 waits for it in the
    # first collective, and its deadline turns the wait into a FAIL line naming where it waited. --timeout bounds
    # the waits for other ranks only: rank 0's own checks before it (TensorFlow's import) may be slow.
    t0 = time.monotonic()
    p = subprocess.run([shutil.which("mpirun"), "--oversubscribe", "--bind-to", "none",
                        "-np", "1", sys.executable, *DOCTOR, "--timeout", "8", ":",
                        "-np", "1", sys.executable, "-c", "from mpi4py import MPI; import time; time.sleep(90)"],
                       env=env(), capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t0
    assert p.returncode != 0 and took < 60, (p.returncode, took, p.stdout, p.stderr)
    found = checks(p.stdout)
    assert found["doctor"][0] == "FAIL" and found["doctor"][1].startswith("no answer within 8 s while in 'ranks'")
    assert " -> a rank is missing or stuck" in found["doctor"][1]
    print(f"\nmissing peer: FAIL line and exit in {took:.1f} s")


@pytest.mark.parametrize("flags, message", [
    (["--bytes", "0"], "argument --bytes: must be > 0, got 0"),
    (["--bytez", "1"], "unrecognized arguments: --bytez 1 (did you mean --bytes?)"),
    (["--timeout", "soon"], "argument --timeout: invalid float value: 'soon'"),
    (["--entry", "gpt"], "argument --entry: invalid choice: 'gpt' (choose from 'resnet', 'bert')"),
])
def test_bad_flag_is_one_line_and_exit_2(flags, message):
    p = doctor("single", 1, *flags, timeout=60)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.strip() == f"hpctrain.doctor: error: {message}"


def test_registry_orders_checks_groups_the_alone_lines_and_turns_errors_into_fail_lines():
    """In process, no framework: the registry's runner on made-up checks (the real ones are registered too)."""
    importlib.import_module("hpctrain.doctor.checks")  # registers them, imports no framework
    assert set(ALWAYS) | set(COLLECTIVES) <= set(REGISTRY)
    assert {REGISTRY[n].alone[0] for n in COLLECTIVES} == {"collectives"} and REGISTRY["run dir"].ranks == "root"

    class Alone:
        size = 1

    def boom(ctx):
        raise OSError("disk on fire")
    specs = [Spec("a", lambda ctx: ("PASS", "fine", None), 1),
             Spec("b", boom, 2, error_fix="call the admins"),
             Spec("c", lambda ctx: ("PASS", "never", None), 3, when=lambda ctx: "not today"),
             Spec("d1", lambda ctx: ("PASS", "never", None), 4, min_ranks=2, alone=("pair", "needs two")),
             Spec("d2", lambda ctx: ("PASS", "never", None), 5, min_ranks=2, alone=("pair", "needs two")),
             Spec("e", lambda ctx: ("PASS", "never", None), 6, min_ranks=2)]
    stages = []
    ctx = Context(args=None, cluster=Alone(), on_stage=lambda stage, waits: stages.append((stage, waits)))
    run_checks(ctx, specs)
    assert [ch.line() for ch in ctx.checks] == [
        "PASS  a: fine", "FAIL  b: OSError: disk on fire -> call the admins", "SKIP  c: not today",
        "SKIP  pair: needs two", "SKIP  e: needs 2 ranks, 1 launched"]
    assert stages == [("a", False), ("b", False), ("c", False)]  # the deadline restarts for every check run
    assert [REGISTRY[n].waits for n in ["python", "mpi4py", "ranks", *COLLECTIVES, "run dir"]] == [
        False, True, True, True, True, True, True, False]
