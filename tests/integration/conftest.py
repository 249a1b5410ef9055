"""Fixtures shared by the end-to-end tests."""
import subprocess
import sys

import pytest

from tests.launch import ROOT, check_ok, env
from tests.unit.test_text import write_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """~130 sequences of 32 tokens: 2 ranks x batch 8 -> 8 steps per epoch."""
    base = tmp_path_factory.mktemp("bert")
    raw = write_corpus(base / "raw", lines=420)
    p = subprocess.run([sys.executable, "-m", "hpctrain.data.text", "prepare", "--input", str(raw), "--output",
                        str(base / "corpus"), "--vocab-size", "300", "--seq-len", "32"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    check_ok(p)
    return base / "corpus"
