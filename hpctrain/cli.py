"""What every entry point shares: parse config or exit 2, detect the cluster, log the config once."""
from __future__ import annotations

import json
import sys

from hpctrain import preempt
from hpctrain.cluster import ClusterEnv, ClusterError, detect
from hpctrain.config import ConfigError, TrainConfig, parse


def fail(prog: str, message: str, code: int = 2):
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def start(argv: list[str] | None, prog: str, config_cls=None) -> tuple[TrainConfig, ClusterEnv]:
    try:
        cfg = parse(argv, prog, config_cls)
        cluster = detect()
    except (ConfigError, ClusterError) as e:
        fail(prog, str(e))
    if cluster.rank == 0:
        print(f"{prog}: {cluster.launcher} launcher, {cluster.size} rank(s) on {cluster.num_nodes} node(s)", flush=True)
        print(f"{prog}: config {json.dumps(cfg.to_dict(), sort_keys=True)}", flush=True)
    return cfg, cluster


def finish(prog: str, cluster: ClusterEnv, step: int, result: dict) -> int:
    """Rank 0 reports the outcome; a preempted run exits with preempt.EXIT_PREEMPTED so the batch
    script knows to requeue."""
    if "stopped_by_signal" in result:
        if cluster.rank == 0:
            print(f"{prog}: stopped at step {step} on {result['stopped_by_signal']}, checkpoint saved: "
                  f"exit {preempt.EXIT_PREEMPTED} (requeue to resume)", flush=True)
        return preempt.EXIT_PREEMPTED
    if cluster.rank == 0:
        print(f"{prog}: done at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                            if isinstance(v, float)), flush=True)
    return 0
