"""Training engines, one package per framework: `engine/torch/` and `engine/tf/`.

This module is framework-neutral: the names config.py validates against, and `load(framework)`,
which imports an engine only once the flags have been checked (torch starts slowly)."""
from __future__ import annotations

import importlib

# The backends each engine offers, first the default. config.py takes its choices from here.
BACKENDS = {"torch": ("horovod", "ddp", "mpi", "none"), "tf": ("horovod", "multiworker", "mirrored", "none")}
# tf.distribute cross-worker collectives (multiworker) and their device rule (auto).
COLLECTIVES = ("auto", "ring", "nccl")
FRAMEWORKS = tuple(BACKENDS)
ALL_BACKENDS = tuple(dict.fromkeys(b for names in BACKENDS.values() for b in names))


def load(framework: str):
    """The engine module: `build_trainer(recipe, cfg, cluster)` -> a resumed trainer (see hpctrain.loop).
    The framework's start-up lines on stderr are shown only if the import fails (hpctrain.quiet)."""
    from hpctrain import quiet
    with quiet.captured():
        return importlib.import_module(f"hpctrain.engine.{framework}")
