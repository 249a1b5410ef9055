"""Names of the model architectures, importable without torch or transformers (config, CLI help).

The modules that build the models (hpctrain.models.resnet, hpctrain.models.bert) take their tables'
keys from here, so a name added in one place and not the other fails at import.
"""
from __future__ import annotations

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
BERT_PRESETS = ("tiny", "mini", "base", "large")
