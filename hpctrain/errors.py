"""Errors that end a run with a one-line message, and the exit codes every entry point uses.
Framework-neutral.

Every bad-input error derives from `UserError`; the entry point catches `ExitError` (the base of all
of them), prints its message as one line, once (not once per rank), and exits with its `exit_code`.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2       # bad input: a flag, a file, a directory, a launcher setup
EXIT_PREEMPTED = 85       # stopped on a signal after a checkpoint was saved: requeue to resume
EXIT_HANG = 86            # the hang watchdog fired: no training progress for --hang-timeout seconds
EXIT_SAVE_FAILED = 87     # a checkpoint could not be written (full disk, I/O error): do not requeue blindly
EXIT_NONFINITE = 88       # the loss or the weights became NaN/inf: nothing of them was saved
EXIT_ABORTED = 130        # a second Ctrl-C (SIGINT): ended at once, no checkpoint (the shell's code for SIGINT)


class ExitError(Exception):
    """Ends the run: one line (the message), exit code `exit_code`."""
    exit_code = 1


class UserError(ExitError):
    """Bad input the user can fix (a value, a path, a launcher setup)."""
    exit_code = EXIT_USER_ERROR


class DataError(UserError, ValueError):
    """Bad data or a bad data setting (a dataset, a corpus, an image folder); the message names the value or path."""


class CheckpointSaveError(ExitError):
    """Rank 0 could not write a checkpoint; every rank raises it after the save's collective."""
    exit_code = EXIT_SAVE_FAILED


class NonFiniteError(ExitError):
    """The rank-averaged loss, or the weights about to be saved, are not finite."""
    exit_code = EXIT_NONFINITE


def rebuild(exit_code: int, message: str) -> ExitError:
    """The error another rank raised, from its code and message (what a broadcast verdict carries)."""
    for cls in (UserError, CheckpointSaveError, NonFiniteError):
        if cls.exit_code == exit_code:
            return cls(message)
    error = ExitError(message)
    error.exit_code = exit_code
    return error
