"""Run under `mpirun -np 4`. The pipelined model's gradients and parameters must equal single-process
training on the same global batch (float64, so any difference is a bug, not rounding), for P = 2
(x 2 replicas) and P = 3, M = 1..4, both schedules; and 1F1B / GPipe must hold exactly the activations
their schedule promises. Models: an MLP with a tied input/output weight (and BatchNorm), ResNet-18's
blocks, BERT-tiny's blocks (embedding tied to the MLM decoder across the first and last stage).

    mpirun -np 4 python tests/parallel/worker_pipeline.py OUT_DIR
Each rank writes OUT_DIR/rank<r>.json (long lines from several ranks interleave on stdout); any
mismatch raises and aborts the job (non-zero exit)."""
import copy
import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI
from torch import nn
from torch.nn.functional import cross_entropy

from hpctrain.engine.torch.pipeline.runtime import Grid, PipelineStage
from hpctrain.engine.torch.pipeline.step import tied_parameters
from hpctrain.pipeline.partition import LayerCost, partition

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD


class Fn(nn.Module):
    def __init__(self, fn, *mods):
        super().__init__()
        self.fn, self.parts = fn, nn.ModuleList(mods)

    def forward(self, x, batch=None):
        return self.fn(x)


class TiedMLP(nn.Module):
    def __init__(self, d=6, h=16):
        super().__init__()
        self.tie = nn.Linear(d, h, bias=False)  # input projection, reused (transposed) by the head
        self.l1, self.l2, self.l3 = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.bn = nn.BatchNorm1d(h)

    def blocks(self):
        return [("embed", Fn(self.tie, self.tie)), ("l1", Fn(lambda x: torch.tanh(self.l1(x)), self.l1)),
                ("bn", Fn(self.bn, self.bn)), ("l2", Fn(lambda x: torch.relu(self.l2(x)), self.l2)),
                ("l3", Fn(self.l3, self.l3)), ("head", Fn(lambda x: x @ self.tie.weight, self.tie))]


class Task:
    def inputs(self, batch):
        return batch[0]

    def loss(self, out, batch):
        loss = cross_entropy(out, batch[1])
        return loss, torch.stack([loss.detach() * len(batch[1]), (out.argmax(1) == batch[1]).sum().double(),
                                  torch.tensor(float(len(batch[1])))])


def uniform_plan(blocks, P):
    return partition([LayerCost(n, 1.0, 1, 1) for n, _ in blocks], P, "uniform")


def reference(model, blocks, task, data, steps, lr):
    """One process over the global batch: every replica's micro-batches, loss mean over all of them."""
    ref = copy.deepcopy(model)
    ref_blocks = task_blocks(ref, blocks)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        n = sum(len(micro) for micro in data)
        for micro in data:  # replica r, in micro-batch order
            for batch in micro:
                x = task.inputs(batch)
                for _, b in ref_blocks:
                    x = b(x, batch)
                (task.loss(x, batch)[0] / n).backward()
        grads.append({k: p.grad.clone() for k, p in ref.named_parameters()})
        opt.step()
    return ref, grads


def task_blocks(model, like):
    return model.blocks() if hasattr(model, "blocks") else like(model)


def run_case(name, build, make_batch, task, P, M, schedule, comm, steps=3, lr=0.05):
    grid = Grid(comm, P)
    torch.manual_seed(0)
    model = build()
    blocks = task_blocks(model, getattr(task, "blocks", None))
    D = grid.replicas
    torch.manual_seed(1)
    data = [[make_batch() for _ in range(M)] for _ in range(D)]  # same on every rank (same seed)
    ref, ref_grads = reference(model, getattr(task, "blocks", None), task, data, steps, lr)
    plan = uniform_plan(blocks, P)
    a, b = plan.stages[grid.stage]
    mine = [blk for _, blk in blocks[a:b]]
    tied = {s: ps if grid.stage in s else [] for s, ps in tied_parameters(blocks, plan).items()}
    stage = PipelineStage(mine, grid, task, torch.device("cpu"), schedule, M, tied=tied)
    opt = torch.optim.SGD(stage.params, lr=lr, momentum=0.9)
    names = {id(p): k for k, p in model.named_parameters()}
    worst_grad = 0.0
    for step in range(steps):
        stage.zero_grad()
        model.train()
        stage.step(data[grid.replica])
        for p in stage.params:
            worst_grad = max(worst_grad, _rel(p.grad, ref_grads[step][names[id(p)]]))
        opt.step()
    ref_params = dict(ref.named_parameters())
    worst_param = max(_rel(p, ref_params[names[id(p)]]) for p in stage.params)
    expect = min(P - grid.stage, M) if schedule == "1f1b" else M
    assert stage.peak_in_flight == expect, (name, P, M, schedule, grid.stage, stage.peak_in_flight, expect)
    assert worst_grad < 1e-10 and worst_param < 1e-10, (name, P, M, schedule, grid.stage, worst_grad, worst_param)
    return {"case": name, "P": P, "D": D, "M": M, "schedule": schedule, "stage": grid.stage,
            "in_flight": stage.peak_in_flight, "grad_diff": worst_grad, "param_diff": worst_param,
            "tied": sum(len(v) for v in tied.values())}


def _rel(a, b) -> float:
    """Largest difference relative to the tensor's scale (float64: rounding gives ~1e-15). The floor
    keeps gradients that are zero in exact arithmetic (BERT's key bias: ~1e-20) from dividing noise by noise."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-8)).item()


def mlp_batch():
    return torch.randn(3, 6), torch.randint(0, 6, (3,))


def main():
    rank = WORLD.Get_rank()
    assert WORLD.Get_size() == 4, "run with mpirun -np 4"
    three = WORLD.Split(color=0 if rank < 3 else MPI.UNDEFINED, key=rank)
    results = []
    for P, comm in ((2, WORLD), (3, three)):
        for M in (1, 2, 3, 4):
            for schedule in ("1f1b", "gpipe"):
                if comm != MPI.COMM_NULL:
                    results.append(run_case("tied-mlp", TiedMLP, mlp_batch, Task(), P, M, schedule, comm))
    from hpctrain.engine.torch import Classification
    from hpctrain.models.resnet import build_resnet

    class ResNetTask(Classification):  # float64 loss (the default casts logits to float32)
        def loss(self, logits, batch):
            return Task.loss(self, logits, batch)

    results.append(run_case("resnet18", lambda: build_resnet("resnet18", 4), lambda: (
        torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))), ResNetTask(), 2, 2, "1f1b", WORLD, steps=2))
    from hpctrain.models.bert import MaskedLM, build_bert

    def bert_batch():
        ids = torch.randint(5, 50, (2, 12))
        labels = torch.where(torch.rand(2, 12) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 1] = ids[:, 1]  # at least one masked token per row
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # padding in one row: the attention mask must reach every stage
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}

    for schedule in ("1f1b", "gpipe"):
        if three != MPI.COMM_NULL:
            results.append(run_case("bert-tiny", lambda: build_bert("tiny", 50, 12, dropout=0.0), bert_batch,
                                    MaskedLM(), 3, 3, schedule, three, steps=2))
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback
        traceback.print_exc()
        WORLD.Abort(1)  # a failed rank must not leave the others waiting in a collective
