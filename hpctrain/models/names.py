"""Model architectures by name, importable without torch, TensorFlow or transformers (config, CLI help).

Both frameworks build their models from these tables (hpctrain.models.resnet / .bert for torch,
hpctrain.models.tf for Keras), so a name exists in both or in neither."""
from __future__ import annotations

from hpctrain.choices import BERT_PRESETS, RESNET_ARCHS

# Block kind and blocks per stage (torchvision's layout).
RESNET_BLOCKS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
# (layers, hidden, heads, intermediate); vocabulary size and maximum positions come from the corpus.
BERT_SIZES = {
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}
if tuple(RESNET_BLOCKS) != RESNET_ARCHS or tuple(BERT_SIZES) != BERT_PRESETS:
    raise ImportError("hpctrain.models.names and hpctrain.choices name different models")
__all__ = ["BERT_PRESETS", "BERT_SIZES", "RESNET_ARCHS", "RESNET_BLOCKS"]
