"""The peer for benchmarks/scaling.py: a minimal Horovod training loop on fixed synthetic tensors,
as in Horovod's own pytorch_synthetic_benchmark.py. Same model code, no hpctrain machinery.

    mpirun -np 2 python benchmarks/plain_horovod.py --arch resnet18 --batch-size 32 --steps 12
Prints one JSON line (rank 0): samples/s per rank and in total, after 2 warm-up steps.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpctrain.models.resnet import build_resnet  # noqa: E402  the architecture only

p = argparse.ArgumentParser()
p.add_argument("--arch", default="resnet18")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--image-size", type=int, default=64)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--threads", type=int, default=1)
a = p.parse_args()

hvd.init()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
model = build_resnet(a.arch, 10)
opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size(), momentum=0.9)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(opt, root_rank=0)
x = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
y = torch.randint(0, 10, (a.batch_size,))


def step():
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


for _ in range(2):
    step()
t = time.perf_counter()
for _ in range(a.steps - 2):
    step()
rate = a.batch_size * (a.steps - 2) / (time.perf_counter() - t)
total = hvd.allreduce(torch.tensor(rate), op=hvd.Sum, name="rate").item()
if hvd.rank() == 0:
    print(json.dumps({"samples_per_s_rank": total / hvd.size(), "samples_per_s_total": total}), flush=True)
