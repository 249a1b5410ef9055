"""Stand up a real Slurm cluster on this machine for the tests (see harness.py)."""
from tests.slurm_cluster.harness import ClusterError, SlurmCluster, ensure_installed

__all__ = ["ClusterError", "SlurmCluster", "ensure_installed"]
