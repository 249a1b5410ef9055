"""One-line argparse errors for hpctrain's entry points. Framework-neutral, stdlib only.

Plain argparse answers a bad flag by printing its usage block and exiting 2, once per rank of a job.
`OneLineParser` raises instead: `error_class(message)` (a `UserError` subclass, `UserError` itself by
default), one line, which the entry point prints once (rank 0) and turns into the error's exit code
(2 for every UserError). An unknown flag gets a did-you-mean hint from the parser's own flags, including
those added through argument groups and mutually exclusive groups.

    from hpctrain.oneline import OneLineParser

    parser = OneLineParser(prog="hpctrain.doctor", error_class=MyError)  # MyError(UserError)
    parser.add_argument("--bytes", type=int, default=16 << 20)
    try:
        args = parser.parse_args(argv)
    except MyError as e:   # "unrecognized arguments: --bytez 1 (did you mean --bytes?)"
        if rank == 0:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code

A check of one's own after parsing goes the same way: `parser.error("argument --bytes: must be > 0")`.
`--help` still prints the help and exits 0.
"""
from __future__ import annotations

import argparse
import difflib

from hpctrain.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise `error_class(one line)` instead of printing usage and exiting."""

    def __init__(self, *args, error_class: type[UserError] = UserError, **kwargs):
        if not (isinstance(error_class, type) and issubclass(error_class, UserError)):
            raise TypeError(f"error_class must be a subclass of hpctrain.errors.UserError, got {error_class!r}")
        self.error_class = error_class
        self.flags: list[str] = []  # every option string added, for the did-you-mean hint
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.flags.extend(action.option_strings)
        return action

    def add_argument_group(self, *args, **kwargs):
        return counting(super().add_argument_group(*args, **kwargs), self.flags)

    def add_mutually_exclusive_group(self, *args, **kwargs):
        return counting(super().add_mutually_exclusive_group(*args, **kwargs), self.flags)

    def error(self, message: str):
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()
            hints = [m for b in bad for m in difflib.get_close_matches(b.split("=")[0], self.flags, n=1)]
            message += f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else \
                " (see --help for the options)"
        raise self.error_class(message)


def counting(group, flags: list[str]):
    """`group` (an argument group or mutually exclusive group), with the option strings of every argument
    added to it, or to a group made from it, appended to `flags`."""
    add, exclusive = group.add_argument, group.add_mutually_exclusive_group

    def add_argument(*args, **kwargs):
        action = add(*args, **kwargs)
        flags.extend(action.option_strings)
        return action

    group.add_argument = add_argument
    group.add_mutually_exclusive_group = lambda *a, **k: counting(exclusive(*a, **k), flags)
    return group
