"""Libraries' start-up noise off the console. Framework-neutral, stdlib only.

TensorFlow (its absl logging before initialisation: "WARNING: All log messages before absl::InitializeLog()",
"Could not find cuda drivers", "failed call to cuInit" on every CPU machine) writes to file descriptor 2
from C++, where neither TF_CPP_MIN_LOG_LEVEL nor Python's logging reach. `captured()` points fd 2 at a
temporary file for a short block and shows what was caught only if the block fails with something other
than hpctrain's own one-line error. Keep such blocks short and free of collectives: the hang watchdog's
report would land in the file too.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from hpctrain.errors import ExitError


@contextlib.contextmanager
def captured():
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except ExitError:
            raise
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
