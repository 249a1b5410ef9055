"""By hand: `python -m tests.slurm_cluster start DIR [--nodes 8]`, then `stop DIR`.

`start` prints the `export SLURM_CONF=...` line for the shell; `stop` ends the daemons recorded in
DIR/pids (only those).
"""
import argparse
import sys

from tests.slurm_cluster.harness import ClusterError, SlurmCluster, ensure_installed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.slurm_cluster")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("dir", help="directory for config, state, logs and pid files")
    p.add_argument("--nodes", type=int, default=8)
    a = p.parse_args(argv)
    cluster = SlurmCluster(a.dir, nodes=a.nodes)
    try:
        if a.action == "start":
            ensure_installed(log=lambda m: print(m, file=sys.stderr))
            took = cluster.start()
            print(f"# {a.nodes} node(s) idle after {took:.1f} s", file=sys.stderr)
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            cluster.stop()
    except ClusterError as e:
        print(f"slurm_cluster: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
