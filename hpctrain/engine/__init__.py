"""Training engines, one package per framework: `engine/torch/` and `engine/tf/`, behind one contract
(engine/trainer.py) and one build sequence (engine/build.py). This module is framework-neutral: `load`
imports an engine only once the flags have been checked (torch starts slowly)."""
from __future__ import annotations

import importlib


def load(framework: str):
    """The engine module of `framework` (its `setup` and `make_trainer`). The framework's start-up lines on
    stderr are shown only if the import fails (hpctrain.quiet)."""
    from hpctrain import quiet
    with quiet.captured():
        return importlib.import_module(f"hpctrain.engine.{framework}")
