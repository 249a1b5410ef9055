"""Recipes: one small object per model family (recipes/<name>.py defines RECIPE). `get("bert")`."""
from __future__ import annotations

import importlib

NAMES = ("resnet", "bert")


def get(name: str):
    if name not in NAMES:
        raise ValueError(f"recipe {name!r} is not one of: {', '.join(NAMES)}")
    return importlib.import_module(f"hpctrain.recipes.{name}").RECIPE
