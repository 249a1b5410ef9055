"""hpctrain's ResNets against torchvision's (keys, shapes, parameter counts in tests/fixtures,
dumped from torchvision 0.29.1 by scripts/dump_torchvision_resnet.py)."""
import json
from pathlib import Path

import pytest
import torch

from hpctrain.models.resnet import build_resnet

REF = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "torchvision_resnet.json").read_text())


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_state_dict_matches_torchvision(arch):
    model = build_resnet(arch, num_classes=1000)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == REF["models"][arch]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == REF["models"][arch]["num_parameters"]


def test_resnet50_published_parameter_count():
    assert sum(p.numel() for p in build_resnet("resnet50").parameters()) == 25_557_032


def test_torchvision_layout_weights_load_and_run():
    # A state_dict with torchvision's names and shapes loads strictly and gives the same outputs.
    src = build_resnet("resnet18", 1000)
    sd = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    sd = {k: (v.abs() + 0.5 if "running_var" in k else v) for k, v in sd.items()}
    a, b = build_resnet("resnet18", 1000), build_resnet("resnet18", 1000)
    a.load_state_dict(sd, strict=True)
    b.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_zero_init_residual_and_forward_shape():
    m = build_resnet("resnet50", num_classes=7, zero_init_residual=True)
    assert all(float(b.bn3.weight.abs().sum()) == 0 for layer in (m.layer1, m.layer4) for b in layer)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet9.*resnet18, resnet34, resnet50, resnet101"):
        build_resnet("resnet9")
