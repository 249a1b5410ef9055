"""The benchmarked models and how a stage of them is timed: ResNet / BERT builders with a batch maker,
a stage's forward + backward timing, and each block's input and output gradient at a cut."""
from __future__ import annotations

import time


def build(kind: str, name: str, image_size: int = 64, micro_batch: int = 8, seq_len: int = 128, vocab: int = 8000):
    """(model, task, make_batch(generator)) for a ResNet or a BERT preset; the model is in train mode."""
    import torch
    if kind == "resnet":
        from hpctrain.engine.torch import Classification
        from hpctrain.models.resnet import build_resnet
        model = build_resnet(name, 10)

        def make_batch(gen):
            return (torch.randn(micro_batch, 3, image_size, image_size, generator=gen),
                    torch.randint(0, 10, (micro_batch,), generator=gen))
        return model.train(), Classification(), make_batch
    from hpctrain.models.bert import MaskedLM, build_bert
    model = build_bert(name, vocab, seq_len)

    def make_batch(gen):
        ids = torch.randint(5, vocab, (micro_batch, seq_len), generator=gen)
        masked = torch.rand(micro_batch, seq_len, generator=gen) < 0.15
        masked[:, 1] = True  # never an empty selection
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        return {"input_ids": torch.where(masked, torch.full_like(ids, 4), ids),
                "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), "labels": labels}
    return model.train(), MaskedLM(), make_batch


def time_stage(blocks, task, batch, x, grad, first: bool, last: bool, warmup: int, repeats: int):
    """Forward and backward seconds of `blocks` run in order on a detached copy of x, as a pipeline stage
    runs them: the first stage computes no input gradient, the last computes the loss and backs it up,
    the others back up `grad`, the gradient the next stage would send for this batch."""
    fwd, bwd = [], []
    for rep in range(warmup + repeats):
        x_in = x.detach()
        if not first and x_in.is_floating_point():
            x_in.requires_grad_(True)
        t0 = time.perf_counter()
        y = x_in
        for block in blocks:
            y = block(y, batch)
        if last:
            y = task.loss(y, batch)[0]
        t1 = time.perf_counter()
        y.backward(None if last else grad)
        t2 = time.perf_counter()
        if rep >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        for block in blocks:
            block.zero_grad(set_to_none=True)
    return fwd, bwd


def block_io(blocks, task, batch):
    """Per block: its input on this batch and the gradient of the loss with respect to its output (None for
    the last block), from one forward + backward of the whole model with a cut after every block."""
    ins, outs = [], []
    x = task.inputs(batch)
    for i, (_, block) in enumerate(blocks):
        x = x.detach()
        if i and x.is_floating_point():
            x.requires_grad_(True)
        ins.append(x)
        x = block(x, batch)
        outs.append(x)
    task.loss(x, batch)[0].backward()  # stops at the last cut; walk the rest back cut by cut
    for i in range(len(blocks) - 1, 0, -1):
        if i < len(blocks) - 1:
            outs[i].backward(ins[i + 1].grad)
    grads = [ins[i + 1].grad for i in range(len(blocks) - 1)] + [None]
    for _, block in blocks:
        block.zero_grad(set_to_none=True)
    return [x.detach() for x in ins], [g if g is None else g.detach() for g in grads]
