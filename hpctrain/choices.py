"""The closed sets of names the configuration validates against, in one leaf module: it imports nothing of
hpctrain, so config.py (below every engine, data source and model) needs nothing above it. The modules that
own these names (engines, data sources, models, the partitioner, the LR schedule) take them from here."""
from __future__ import annotations

FRAMEWORKS = ("torch", "tf")
# The backends each engine offers, the default first.
BACKENDS = {"torch": ("horovod", "ddp", "mpi", "none"), "tf": ("horovod", "multiworker", "mirrored", "none")}
ALL_BACKENDS = tuple(dict.fromkeys(b for names in BACKENDS.values() for b in names))
STRATEGY_BACKENDS = ("multiworker", "mirrored")  # tf.distribute
COLLECTIVES = ("auto", "ring", "nccl")           # tf.distribute's cross-worker collectives
DATASETS = ("shapes", "synthetic", "folder")     # image sources; the built-in one first
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
BERT_PRESETS = ("tiny", "mini", "base", "large")
OPTIMIZERS = ("sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
LR_SCHEDULES = ("cosine", "step", "constant", "poly")
WARMUP_STARTS = ("base", "zero")
AMP = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
PARTITION_METHODS = ("time", "params", "uniform")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
PIPELINE_ALLREDUCE = ("mpi", "horovod")
PROGRESS = ("auto", "always", "never")
# What crosses the network and when (hpctrain.sync): every gradient every step, the model every K steps, low-rank
# factors of the gradients, the model mixed with peers, a parameter server. The first is the default.
SYNC_STRATEGIES = ("allreduce", "local-sgd", "powersgd", "gossip", "ps")
GOSSIP_GRAPHS = ("exponential", "ring")
PS_MODES = ("sync", "async")
SYNC_TF = ("allreduce", "local-sgd")  # the TF engine: local SGD on its horovod backend; the rest is PyTorch-only
