#!/usr/bin/env python3
"""Print requirements/lock.txt (or base.in) without the packages that only the frameworks left out need.

    python3 scripts/lock_select.py --frameworks torch [--drop 'horovod|torch'] requirements/lock.txt

Which packages a framework alone needs comes from pip-compile's `# via` lines: a framework's roots go,
then every package all of whose dependents are gone (and that base.in does not ask for), until none is
left. --drop names further packages to leave out (install.sh builds or installs those itself). A file
without `# via` lines (base.in) loses only the roots and --drop. Standard library only: it runs before
the venv has anything in it.
"""
from __future__ import annotations

import argparse
import re
import sys

# The base.in packages each framework brings in; torch is always installed (hpctrain's data path needs it).
ROOTS = {"torch": {"torch"}, "tf": {"tensorflow", "keras-hub"}}
ALLOWED = ("torch", "torch,tf")
DIRECT = "-r base.in"
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


class SelectError(ValueError):
    """Bad input: one line naming the value and what is allowed."""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def frameworks(text: str) -> set[str]:
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    if not chosen or not chosen <= set(ROOTS) or "torch" not in chosen:
        raise SelectError(f"--frameworks: {text!r} is not allowed (allowed: {', '.join(ALLOWED)})")
    return chosen


def blocks(text: str) -> list[tuple[str | None, list[str]]]:
    """(normalised package name or None for comments before the first package, its lines)."""
    out: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines(keepends=True):
        m = _NAME.match(line)
        if m:
            out.append((normalise(m.group(1)), [line]))
        else:
            out[-1][1].append(line)
    return out


def dependents(lines: list[str]) -> set[str]:
    """Who needs this package, from its `# via` comment (one name on the line, or one per line after it)."""
    via: set[str] = set()
    in_via = False
    for line in lines[1:]:
        comment = line.strip()
        if not comment.startswith("#"):
            continue
        body = comment[1:].strip()
        if body.startswith("via"):
            in_via = True
            body = body[3:].strip()
        elif not in_via or not line.startswith("    #   "):
            in_via = False
            continue
        if body:
            via.add(DIRECT if body.startswith("-r ") else normalise(body))
    return via


def dropped(parsed: list[tuple[str | None, list[str]]], chosen: set[str], extra: set[str]) -> set[str]:
    gone = {root for fw, roots in ROOTS.items() if fw not in chosen for root in roots}
    needs = {name: dependents(lines) for name, lines in parsed if name}
    changed = True
    while changed:
        changed = False
        for name, via in needs.items():
            if name not in gone and via and DIRECT not in via and via <= gone:
                gone.add(name)
                changed = True
    return gone | extra


def select(text: str, chosen: set[str], extra: set[str] = frozenset()) -> str:
    parsed = blocks(text)
    gone = dropped(parsed, chosen, {normalise(e) for e in extra})
    return "".join("".join(lines) for name, lines in parsed if name not in gone)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lock_select.py", description=__doc__.splitlines()[0])
    p.add_argument("--frameworks", default="torch,tf", help=f"one of: {', '.join(ALLOWED)}")
    p.add_argument("--drop", default="", help="more packages to leave out, separated by '|'")
    p.add_argument("file", help="requirements/lock.txt or requirements/base.in")
    args = p.parse_args(argv)
    try:
        chosen = frameworks(args.frameworks)
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (SelectError, OSError) as e:
        print(f"lock_select.py: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(select(text, chosen, {d for d in args.drop.split("|") if d}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
