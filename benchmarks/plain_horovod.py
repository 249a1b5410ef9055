"""The peer for benchmarks/scaling.py: a minimal Horovod training loop on fixed synthetic tensors,
as in Horovod's own pytorch_synthetic_benchmark.py. Same model code, no hpctrain machinery.

    mpirun -np 2 python benchmarks/plain_horovod.py --arch resnet18 --batch-size 32 --steps 12
    horovodrun -np 1 python benchmarks/plain_horovod.py --device cuda --amp fp16 --arch resnet50 \
        --image-size 224 --batch-size 256
    mpirun -np 2 python benchmarks/plain_horovod.py --model bert --bert-preset tiny --seq-len 128 --vocab-size 7738
Prints one JSON line (rank 0): samples/s per rank and in total, after 2 warm-up steps (BERT: a sample is
one sequence).

--model bert: transformers' BertForMaskedLM built from a BertConfig exactly as hpctrain.models.bert does
(preset sizes from hpctrain.models.names, max positions = --seq-len, [PAD] = 0, dropout 0.1), on one fixed
batch of random token ids (attention mask of ones) with MLM labels on ~15% of the positions (-100
elsewhere), AdamW (lr 1e-4 x ranks). --mlm-head masked (default) scores only the labelled positions
(model.cls on the selected hidden states), as hpctrain's torch MaskedLM does under Horovod; full is the
textbook `model(..., labels=labels).loss`, the vocabulary projection on every position (what hpctrain's
DDP path runs, DDP needing the model's own forward).
--device cuda takes the GPU of the local rank; --amp bf16|fp16 runs forward and loss under autocast, fp16
with a GradScaler stepped the way Horovod needs (synchronize, unscale, step without re-syncing).
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
from hpctrain.models.names import BERT_SIZES
from hpctrain.models.resnet import build_resnet

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["resnet", "bert"], default="resnet")
p.add_argument("--arch", default="resnet18")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--image-size", type=int, default=64)
p.add_argument("--bert-preset", choices=list(BERT_SIZES), default="tiny")
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--vocab-size", type=int, default=8000,
               help="BERT vocabulary (scaling.py passes the one its built-in corpus' tokenizer produced)")
p.add_argument("--mlm-head", choices=["masked", "full"], default="masked",
               help="BERT: vocabulary projection on the labelled positions only (hpctrain's Horovod path) or "
                    "on every position (HF's labels= loss, hpctrain's DDP path)")
p.add_argument("--steps", type=int, default=12)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
p.add_argument("--no-comm", action="store_true",
               help="the machine's ceiling: every rank trains alone (no gradient allreduce); the ranks only line "
                    "up before the timed window and sum their rates after it")
a = p.parse_args()
if a.amp == "fp16" and a.device != "cuda":
    p.error("--amp fp16 needs --device cuda")
if a.model == "bert" and (a.seq_len < 8 or a.vocab_size <= 5):
    p.error("--model bert needs --seq-len >= 8 and --vocab-size > 5 (ids 0..4 are the special tokens)")

hvd.init()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.device == "cuda":
    torch.cuda.set_device(hvd.local_rank())
device = torch.device(a.device, hvd.local_rank()) if a.device == "cuda" else torch.device("cpu")
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.amp)
scaler = torch.amp.GradScaler("cuda") if a.amp == "fp16" else None


def build_bert():
    """hpctrain.models.bert.build_bert's model: BertForMaskedLM from a BertConfig of the preset's sizes."""
    from transformers import BertConfig, BertForMaskedLM
    layers, hidden, heads, inter = BERT_SIZES[a.bert_preset]
    return BertForMaskedLM(BertConfig(vocab_size=a.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=inter,
                                      max_position_embeddings=a.seq_len, pad_token_id=0, hidden_dropout_prob=0.1,
                                      attention_probs_dropout_prob=0.1))


if a.model == "bert":
    model = build_bert().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4 * hvd.size())
else:
    model = build_resnet(a.arch, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size(), momentum=0.9)
if not a.no_comm:
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
if a.model == "bert":  # one fixed batch: random non-special ids, every position attended, ~15% labelled
    ids = torch.randint(5, a.vocab_size, (a.batch_size, a.seq_len), device=device)
    attention = torch.ones_like(ids)
    labelled = torch.rand(ids.shape, device=device) < 0.15
    labelled[:, 1] = True  # at least one target per sequence, as hpctrain's masking guarantees
    labels = torch.where(labelled, ids, torch.full_like(ids, -100))
else:
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size, device=device)
    y = torch.randint(0, 10, (a.batch_size,), device=device)


def forward_loss():
    if a.model == "resnet":
        return F.cross_entropy(model(x), y)
    if a.mlm_head == "full":
        return model(input_ids=ids, attention_mask=attention, labels=labels).loss
    hidden = model.bert(input_ids=ids, attention_mask=attention)[0]
    return F.cross_entropy(model.cls(hidden[labelled]).float(), ids[labelled])


def step():
    opt.zero_grad()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = forward_loss()
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    if a.no_comm:
        scaler.step(opt)
    else:
        opt.synchronize()
        scaler.unscale_(opt)
        with opt.skip_synchronize():
            scaler.step(opt)
    scaler.update()


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


for _ in range(2):
    step()
sync()
hvd.allreduce(torch.zeros(1), name="start")  # every rank starts its timed window together
t = time.perf_counter()
for _ in range(a.steps - 2):
    step()
sync()
rate = a.batch_size * (a.steps - 2) / (time.perf_counter() - t)
total = hvd.allreduce(torch.tensor(rate), op=hvd.Sum, name="rate").item()
if hvd.rank() == 0:
    print(json.dumps({"samples_per_s_rank": total / hvd.size(), "samples_per_s_total": total,
                      "device": a.device, "amp": a.amp, "no_comm": a.no_comm, "model": a.model}), flush=True)
