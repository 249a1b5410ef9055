"""`python -m hpctrain.doctor` as real processes: alone, under `mpirun -np 2`, and with real faults (a
read-only run directory, a launcher whose MPI is not the one mpi4py/Horovod were built with)."""
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.launch import check_ok, env, run

DOCTOR = ["-m", "hpctrain.doctor"]
LINE = re.compile(r"^(PASS|WARN|FAIL|SKIP)  ([a-z0-9 ]+): (.*)$")
ALWAYS = ["python", "torch", "tensorflow", "horovod", "mpirun", "srun", "mpi4py", "ranks", "mpi library", "gpus",
          "run dir"]
COLLECTIVES = ["horovod allreduce", "horovod broadcast", "mpi4py allreduce", "mpi4py broadcast"]
MISMATCH_FIX = "rebuild with the launcher's MPI module loaded, or launch with that MPI's mpirun / srun --mpi=pmix"


def checks(stdout: str) -> dict:
    """name -> (status, rest of the line); asserts every stdout line is a check or the one launch line."""
    found, launches = {}, []
    for line in stdout.splitlines():
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


def doctor(launcher: str, np: int, *flags: str, timeout: int = 150, **extra_env) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    p = run(launcher, np, [*DOCTOR, *flags], timeout=timeout, extra_env=extra_env)
    print(f"\ndoctor {launcher} -np {np} {' '.join(flags)}: rc {p.returncode} in {time.monotonic() - t0:.1f} s")
    return p


def test_single_process_passes_and_json_lists_the_same_checks(tmp_path):
    run_dir = tmp_path / "new" / "run"
    p = doctor("single", 1, "--run-dir", str(run_dir))
    check_ok(p)
    found = checks(p.stdout)
    assert set(ALWAYS) | {"collectives", "launch"} <= set(found), found
    assert all(status != "FAIL" for status, _ in found.values()), p.stdout
    assert found["ranks"] == ("PASS", "single launcher, 1 rank(s) on 1 node(s); mpi4py and Horovod agree")
    assert found["collectives"][0] == "SKIP" and "run the doctor under the launcher" in found["collectives"][1]
    assert found["run dir"][0] == "PASS" and re.search(r"\(\d+ MB/s write\)", found["run dir"][1])
    assert "hpctrain.resnet" in found["launch"][1]
    assert not (tmp_path / "new").exists()  # the write test leaves nothing behind, not even the directories
    for status, rest in found.values():  # WARN carries a fix, PASS does not
        assert (" -> " in rest) == (status == "WARN"), rest

    j = doctor("single", 1, "--run-dir", str(run_dir), "--json")
    check_ok(j)
    doc = json.loads(j.stdout)
    assert [c["name"] for c in doc["checks"]] == [n for n in found if n != "launch"]
    assert [c["status"] for c in doc["checks"]] == [s for n, (s, _) in found.items() if n != "launch"]
    assert doc["launch"] == found["launch"][1] and doc["ranks"] == 1
    assert all(set(c) == {"status", "name", "detail", "fix"} for c in doc["checks"])


def test_mpirun_two_ranks_collectives_pass_and_print_once(tmp_path):
    p = doctor("mpirun", 2, "--run-dir", str(tmp_path / "run"))
    check_ok(p)
    found = checks(p.stdout)  # also asserts: every check printed once, one launch line
    assert set(ALWAYS) | set(COLLECTIVES) <= set(found) and "collectives" not in found, p.stdout
    assert found["ranks"] == ("PASS", "openmpi launcher, 2 rank(s) on 1 node(s); mpi4py and Horovod agree")
    for name in COLLECTIVES:
        status, rest = found[name]
        gbps = float(re.search(r"busbw ([\d.]+) GB/s at 16 MiB", rest)[1])
        assert status == "PASS" and rest.startswith("result correct; busbw") and gbps > 0, (name, rest)
    assert found["launch"][1].startswith("mpirun -np 2 ") and found["launch"][1].endswith("-m hpctrain.resnet")
    assert len(p.stdout.splitlines()) == len(found)


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
    # first collective, and its watchdog turns the wait into a FAIL line naming where it waited.
    t0 = time.monotonic()
    p = subprocess.run([shutil.which("mpirun"), "--oversubscribe", "--bind-to", "none",
                        "-np", "1", sys.executable, *DOCTOR, "--timeout", "8", ":",
                        "-np", "1", sys.executable, "-c", "from mpi4py import MPI; import time; time.sleep(90)"],
                       env=env(), capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t0
    assert p.returncode != 0 and took < 40, (p.returncode, took, p.stdout, p.stderr)
    found = checks(p.stdout)
    assert found["doctor"][0] == "FAIL" and found["doctor"][1].startswith("no answer within 8 s while in 'ranks'")
    assert " -> a rank is missing or stuck" in found["doctor"][1]
    print(f"\nmissing peer: FAIL line and exit in {took:.1f} s")


@pytest.mark.parametrize("flags, message", [
    (["--bytes", "0"], "argument --bytes: must be > 0, got 0"),
    (["--bytez", "1"], "unrecognized arguments: --bytez 1"),
    (["--timeout", "soon"], "argument --timeout: invalid float value: 'soon'"),
])
def test_bad_flag_is_one_line_and_exit_2(flags, message):
    p = doctor("single", 1, *flags, timeout=60)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.strip() == f"hpctrain.doctor: error: {message}"
