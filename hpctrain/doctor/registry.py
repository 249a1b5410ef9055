"""The doctor's checks: each one a small function registered with `@check`. Framework-neutral.

    @check("ctrl-c", order=65, when=open_mpi_launch)
    def ctrl_c(ctx: Context) -> Outcome:
        ...
        return "WARN", "what was found", "what to do"      # or ("PASS", found, None)

- `name`: the check's name on its line, `PASS|WARN|FAIL|SKIP  <name>: <found>[ -> <fix>]`.
- `order`: where its line goes, and when it runs (ascending; checks of equal order in registration order).
  Checks that start a subprocess order before `mpi4py` (70): fork() after MPI_Init is unsafe on some
  transports. Collectives order after `ranks` (80), which starts Horovod and knows what connects the ranks.
- `ranks`: "all" (every rank runs it, before the results are gathered; rank 0 prints its own line and adds
  ranks that found something else) or "root" (rank 0 alone runs it after the gather: no collective inside).
- `min_ranks`: with fewer ranks the check does not run; `alone=(name, text)` is the one SKIP line that stands
  for every check sharing that name (the four collectives: one "collectives" line), else a SKIP line of its own.
- `when(ctx)`: None to run, or the reason for a SKIP line (TensorFlow not installed, no TF_CONFIG, ...).
- `waits`: it waits for the other ranks (a collective, MPI_Init's fence), so --timeout bounds it; a check that
  works alone gets at least deadline.LOCAL_FLOOR_S (an import from a slow shared file system is not a hang).
  Default: true for `min_ranks` >= 2.
- `error_fix`: the fix on the FAIL line an exception becomes (a check never ends the doctor with a traceback).

A check reads and writes `ctx.facts` (what later checks and the launch line need) and keeps its `found`
text free of rank numbers where every rank would see the same, so ranks that agree add nothing to the line.
Check modules are listed in hpctrain/doctor/checks/__init__.py; a new one is a function there or a new module
added to that list.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hpctrain.doctor.common import Check, Context

SEVERITY = {"PASS": 0, "SKIP": 0, "WARN": 1, "FAIL": 2}
INSTALL_FIX = "reinstall with scripts/install.sh, with the site's MPI module loaded"
Outcome = tuple[str, str, str | None]  # (status, found, fix)


@dataclass(frozen=True)
class Spec:
    name: str
    run: Callable[[Context], Outcome]
    order: int
    ranks: str = "all"
    min_ranks: int = 1
    when: Callable[[Context], str | None] | None = None
    error_fix: str = INSTALL_FIX
    alone: tuple[str, str] | None = None
    waits: bool = False


REGISTRY: dict[str, Spec] = {}


def check(name: str, *, order: int, ranks: str = "all", min_ranks: int = 1,
          when: Callable[[Context], str | None] | None = None, error_fix: str = INSTALL_FIX,
          alone: tuple[str, str] | None = None, waits: bool | None = None):
    """Register the decorated function as the check `name` (see the module's docstring)."""
    if ranks not in ("all", "root"):
        raise ValueError(f"check {name!r}: ranks must be 'all' or 'root', got {ranks!r}")

    def register(fn: Callable[[Context], Outcome]):
        if name in REGISTRY:
            raise ValueError(f"check {name!r} is registered twice")
        REGISTRY[name] = Spec(name, fn, order, ranks, min_ranks, when, error_fix, alone,
                              min_ranks > 1 if waits is None else waits)
        return fn
    return register


def registered(ranks: str) -> list[Spec]:
    """The checks that `ranks` ("all" or "root") run, in order."""
    return sorted((s for s in REGISTRY.values() if s.ranks == ranks), key=lambda s: s.order)


def run_checks(ctx: Context, specs: list[Spec]) -> None:
    """Run `specs` in order, appending one line each to ctx.checks (one SKIP line per `alone` group)."""
    alone_done = set()
    for spec in specs:
        if ctx.cluster.size < spec.min_ranks:
            name, why = spec.alone or (spec.name, f"needs {spec.min_ranks} ranks, {ctx.cluster.size} launched")
            if name not in alone_done:
                ctx.checks.append(Check("SKIP", name, why))
                alone_done.add(name)
            continue
        ctx.checks.append(run_one(ctx, spec))


def run_one(ctx: Context, spec: Spec) -> Check:
    """One check; an exception becomes its FAIL line, never a traceback."""
    ctx.enter(spec.name, spec.waits)
    try:
        reason = spec.when(ctx) if spec.when else None
        if reason:
            return Check("SKIP", spec.name, reason)
        status, detail, fix = spec.run(ctx)
    except Exception as e:
        status, detail, fix = "FAIL", f"{type(e).__name__}: {e}".strip(), spec.error_fix
    return Check(status, spec.name, detail, fix)


def position(name: str) -> float:
    """Where a line of this name is printed: its check's order; a line no check registered (the launcher
    notes) first, the doctor's own FAIL last."""
    if name == "doctor":
        return float("inf")
    orders = [s.order for s in REGISTRY.values() if name in (s.name, s.alone and s.alone[0])]
    return min(orders, default=-1)
