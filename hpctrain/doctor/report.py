"""Rank 0's report: every rank's lines merged into one per check, then printed as lines or one JSON document."""
from __future__ import annotations

import json
from dataclasses import asdict

from hpctrain.doctor.common import Check, Context, say
from hpctrain.doctor.registry import SEVERITY, position
from hpctrain.files import atomic_write

SAME_FIX = "ranks should see the same: one shared installation, alike nodes and settings"


def merge(everyone: list) -> list[Check]:
    """Rank 0's line per check, plus every rank that found something else (at least a WARN).
    `everyone`: (rank, host, [check as dict]) per rank, rank 0 first."""
    root = {d["name"]: Check(**d) for d in everyone[0][2]}
    differs: dict[str, dict] = {}
    for rank, host, checks in everyone[1:]:
        for d in checks:
            ref = root.get(d["name"])
            found = (d["status"], d["detail"], d["fix"])
            if ref is None or found != (ref.status, ref.detail, ref.fix):
                differs.setdefault(d["name"], {}).setdefault(found, []).append((rank, host))
    merged = []
    for name in [*root, *(n for n in differs if n not in root)]:
        ch = root.get(name) or Check("PASS", name, "(no result on rank 0)")
        for (status, detail, fix), who in differs.get(name, {}).items():
            ranks = ",".join(str(r) for r, _ in who[:8]) + (f" +{len(who) - 8} more" if len(who) > 8 else "")
            hosts = ",".join(dict.fromkeys(h for _, h in who))
            ch.detail += f"; rank{'s' if len(who) > 1 else ''} {ranks} ({hosts}): {status} {detail}"
            ch.status = max(ch.status, status, "WARN", key=SEVERITY.get)
            ch.fix = ch.fix or fix or SAME_FIX
        merged.append(ch)
    return sorted(merged, key=lambda ch: position(ch.name))


def report(ctx: Context, checks: list[Check], launch: str) -> None:
    """The lines, each followed by its check's table rows if it left any (ctx.facts["tables"][name], indented);
    or one JSON document, with what checks left in ctx.facts["json"] as top-level keys (the network table)."""
    document = json.dumps({"checks": [asdict(ch) for ch in checks], "launch": launch,
                           "launcher": ctx.cluster.launcher, "ranks": ctx.cluster.size, **ctx.facts.get("json", {})})
    if getattr(ctx.args, "json_file", None):  # whole, where a launcher tags or splits long output lines
        atomic_write(ctx.args.json_file, lambda f: f.write(document.encode() + b"\n"))
    if ctx.args.json:
        return say(document)
    tables = ctx.facts.get("tables", {})
    for ch in checks:
        say(ch.line())
        for row in tables.get(ch.name, ()):
            say(f"    {row}")
    say(f"launch: {launch}")
