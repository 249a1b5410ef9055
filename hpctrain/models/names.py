"""Model architectures by name, importable without torch, TensorFlow or transformers (config, CLI help).

Both frameworks build their models from these tables (hpctrain.models.resnet / .bert for torch,
hpctrain.models.tf for Keras), so a name exists in both or in neither."""
from __future__ import annotations

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
RESNET_ARCHS = tuple(RESNET_BLOCKS)
BERT_PRESETS = tuple(BERT_SIZES)
