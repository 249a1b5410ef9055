"""Write tests/fixtures/torchvision_resnet.json: torchvision's ResNet state_dict keys and shapes.

Run once in a venv that has torchvision (it cannot live beside the CPU torch the project uses):
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tv/bin/python scripts/dump_torchvision_resnet.py
The test compares hpctrain's ResNets against this file, so torchvision's weights load into them.
"""
import json
import pathlib

import torchvision
from torchvision import models

out = {"torchvision": torchvision.__version__, "models": {}}
for arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    sd = getattr(models, arch)(weights=None).state_dict()
    params = sum(p.numel() for p in getattr(models, arch)(weights=None).parameters())
    out["models"][arch] = {"num_parameters": params, "state_dict": [[k, list(v.shape)] for k, v in sd.items()]}
path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torchvision_resnet.json"
path.write_text(json.dumps(out, indent=0))
print(f"wrote {path}: " + ", ".join(f"{a} {m['num_parameters']:,}" for a, m in out["models"].items()))
