"""Input pipeline: images/s each source delivers to one rank through the torch DataLoader, beside
what training consumes (forward+backward of the model at the same image size, 1 thread), and a
numpy memcpy of the same bytes as the physical reference.

    python benchmarks/dataloading.py [--workers 0,1,2] [--batches 20]

delivered / consumed >= 1 means the loader keeps up; the folder source decodes real JPEG files
written to a temp directory (ImageNet-like 320x240 images, RandomResizedCrop to 224).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import save_results, stats
from hpctrain.data.images import build_image_sources
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.torch import make_loader
from hpctrain.models.resnet import build_resnet


def jpeg_tree(root: Path, classes: int = 4, per_class: int = 64) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def delivered(source, batch: int, workers: int, batches: int) -> list[float]:
    sampler = ShardedBatchSampler(len(source), 0, 1, batch, seed=0)
    loader = make_loader(source, sampler, workers, torch.device("cpu"))
    rates = []
    for epoch in range(3):  # epoch 0 includes worker start-up: dropped below
        sampler.set_epoch(epoch)
        it = iter(loader)
        next(it)
        t = time.perf_counter()
        n = 0
        for _, (x, _) in zip(range(batches), it):
            n += len(x)
        rates.append(n / (time.perf_counter() - t))
    return rates[1:]


def consumed(arch: str, size: int, batch: int) -> float:
    torch.set_num_threads(1)
    model = build_resnet(arch, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    for i in range(5):
        if i == 2:
            t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return 3 * batch / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("shapes", None, 32, "resnet18"), ("synthetic", None, 224, "resnet50"),
                 ("folder", str(jpeg_tree(Path(tmp))), 224, "resnet50")]
        for dataset, path, size, arch in cases:
            train, _ = build_image_sources(dataset, path, size, 0 if dataset == "folder" else 10, 0,
                                           synthetic_size=4096, log=lambda *_: None)
            need = consumed(arch, size, a.batch_size)
            one = np.empty(3 * size * size * a.batch_size, dtype=np.float32)
            t = time.perf_counter()
            for _ in range(20):
                one.copy()
            memcpy = 20 * a.batch_size / (time.perf_counter() - t)
            for w in [int(x) for x in a.workers.split(",")]:
                mean, ci = stats(delivered(train, a.batch_size, w, a.batches))
                rows.append({"dataset": dataset, "image_size": size, "workers": w, "images_per_s": mean,
                             "images_per_s_ci95": ci, "training_consumes_per_s": need, "model": arch,
                             "delivered_vs_consumed": mean / need, "memcpy_images_per_s": memcpy})
                print(f"{dataset:>9} {size}px workers={w}: {mean:8.1f} +/- {ci:.1f} img/s delivered, "
                      f"{arch} consumes {need:.1f} img/s (x{mean / need:.1f}); memcpy {memcpy:.0f} img/s", flush=True)
    save_results("dataloading", {"batch_size": a.batch_size, "rows": rows}, a.out, a.tag)


if __name__ == "__main__":
    main()
