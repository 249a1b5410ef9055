"""hpctrain.quiet: what a library writes to file descriptor 2 from C stays off the console unless the block fails
with something other than hpctrain's own one-line error. In a child process: fd 2 is process-wide."""
import subprocess
import sys

import pytest

from tests.launch import ROOT, env

CHILD = """
import os, sys
from hpctrain import quiet
from hpctrain.errors import UserError
outcome = sys.argv[1]
try:
    with quiet.captured():
        os.write(2, b"E0000 failed call to cuInit (written by C, not Python)\\n")
        print("python stderr inside", file=sys.stderr)
        if outcome == "crash":
            raise RuntimeError("import failed")
        if outcome == "ours":
            raise UserError("one line of ours")
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
print("after", file=sys.stderr)
"""


@pytest.mark.parametrize("outcome, shown", [("ok", False), ("ours", False), ("crash", True)])
def test_captured_shows_the_noise_only_when_the_block_crashes(outcome, shown):
    p = subprocess.run([sys.executable, "-c", CHILD, outcome], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert ("cuInit" in p.stderr) == shown and ("python stderr inside" in p.stderr) == shown, p.stderr
    if outcome == "crash":
        assert p.returncode == 1 and "RuntimeError: import failed" in p.stderr
    else:
        assert p.returncode == 0 and p.stderr.endswith("after\n")
        assert p.stderr.count("\n") == (2 if outcome == "ours" else 1), p.stderr
