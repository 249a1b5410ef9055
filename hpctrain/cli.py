"""What every entry point shares: parse config or exit 2, detect the cluster, log the config once."""
from __future__ import annotations

import json
import sys

from hpctrain.cluster import ClusterEnv, ClusterError, detect
from hpctrain.config import ConfigError, TrainConfig, parse


def fail(prog: str, message: str, code: int = 2):
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def start(argv: list[str] | None, prog: str) -> tuple[TrainConfig, ClusterEnv]:
    try:
        cfg = parse(argv, prog)
        cluster = detect()
    except (ConfigError, ClusterError) as e:
        fail(prog, str(e))
    if cluster.rank == 0:
        print(f"{prog}: {cluster.launcher} launcher, {cluster.size} rank(s) on {cluster.num_nodes} node(s)", flush=True)
        print(f"{prog}: config {json.dumps(cfg.to_dict(), sort_keys=True)}", flush=True)
    return cfg, cluster
