"""A TF_CONFIG set by hand (tf.distribute's own launch, or one per process under a launcher): it parses and
describes this launch (hpctrain.cluster's parser and check, as --backend multiworker uses them), and this
task's port is free here. No TensorFlow needed: a broken TF_CONFIG is found before TensorFlow starts."""
from __future__ import annotations

import os

from hpctrain import cluster
from hpctrain.doctor.common import Context
from hpctrain.doctor.registry import Outcome, check

PORT_BASE = 23456  # unused when TF_CONFIG is set: tf_config then returns the user's own
TF_CONFIG_FIX = ("give each process its own TF_CONFIG, one task per rank of this launch, or unset it (--backend "
                 "multiworker then builds one from the launcher)")


def tf_config_set(ctx: Context) -> str | None:
    """`when` of the TF_CONFIG checks. Only whether it is set: hpctrain.cluster reads and parses it."""
    return None if "TF_CONFIG" in os.environ else "TF_CONFIG not set (--backend multiworker builds one per launch)"


@check("tf config", order=110, when=tf_config_set, error_fix=TF_CONFIG_FIX)
def tf_config(ctx: Context) -> Outcome:
    c = ctx.cluster
    try:
        conf = cluster.tf_config(c, PORT_BASE)
    except cluster.ClusterError as e:  # malformed, or not this launch: its one line says which
        return "FAIL", str(e), TF_CONFIG_FIX
    jobs = conf["cluster"]
    addresses = jobs.get("chief", []) + jobs.get("worker", [])
    host, port = addresses[c.rank].rsplit(":", 1)
    ctx.facts["tf_task"] = (f"{conf['task']['type']} {conf['task']['index']}", host, int(port))
    hosts = {a.rsplit(":", 1)[0] for a in addresses}
    return "PASS", f"{len(jobs.get('chief', []))} chief(s) and {len(jobs.get('worker', []))} worker(s) on " \
                   f"{len(hosts)} host(s); each process's task is its rank in the {c.launcher} launch", None


def tf_port_wanted(ctx: Context) -> str | None:
    return None if "TF_CONFIG" in os.environ else "TF_CONFIG not set"


@check("tf port", order=115, when=tf_port_wanted)
def tf_port(ctx: Context) -> Outcome:
    if "tf_task" not in ctx.facts:
        return "SKIP", "no usable TF_CONFIG (see tf config)", None
    task, host, port = ctx.facts["tf_task"]
    if cluster.port_in_use(port):
        return "FAIL", f"port {port} of {task} ({host}) is already in use here", \
            f"stop what listens there (ss -ltnp 'sport = :{port}'), or give this task another port in TF_CONFIG"
    return "PASS", "this task's TF_CONFIG port is free here", None
