"""BERT for masked-language-model pretraining (Hugging Face `transformers`): architecture only.

Presets are random-init `BertForMaskedLM`s sized by (layers, hidden, heads, intermediate); vocabulary
size and maximum positions come from the prepared corpus. `load_bert` starts from a local Hugging Face
directory instead (offline: never touches the hub).
"""
from __future__ import annotations

from hpctrain.models.names import BERT_SIZES

PRESETS = BERT_SIZES  # layers, hidden, heads, intermediate: shared with the TF model


def build_bert(preset: str, vocab_size: int, max_positions: int, pad_id: int = 0, dropout: float = 0.1):
    from transformers import BertConfig, BertForMaskedLM
    layers, hidden, heads, inter = PRESETS[preset]
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=max_positions,
                        pad_token_id=pad_id, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(config)


def load_bert(path: str):
    from transformers import BertForMaskedLM
    return BertForMaskedLM.from_pretrained(path, local_files_only=True)


class MaskedLM:
    """Trainer task: batch = MLMSource dict; cross-entropy over the masked positions only.

    Returns (loss, [loss x masked tokens, correct predictions, masked tokens]). The vocabulary projection
    runs only on masked positions (about 15% of tokens) unless the model is wrapped by DDP, whose
    gradient hooks need its own forward. Dropout is seeded from the batch's first sample key, so a run
    resumed mid-epoch draws the same dropout masks as the uninterrupted run."""

    def __call__(self, model, batch):
        import torch
        if model.training and "dropout_seed" in batch:
            torch.manual_seed(int(batch["dropout_seed"][0]))
        sel = batch["labels"] != -100
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            logits = model(**inputs).logits[sel]
        else:
            logits = model.cls(model.bert(**inputs)[0][sel])
        return self.loss(logits, batch)

    # ---- the pipeline runtime's view of the task: blocks, first input, loss on the last output -------
    def loss(self, logits, batch):
        import torch
        from torch.nn.functional import cross_entropy
        labels = batch["labels"]
        target = labels[labels != -100]
        count = target.numel()
        loss = cross_entropy(logits.float(), target) if count else logits.sum() * 0.0
        stats = torch.stack([loss.detach().double() * count, (logits.detach().argmax(-1) == target).sum().double(),
                             torch.tensor(float(count), dtype=torch.float64, device=labels.device)])
        return loss, stats

    def inputs(self, batch):
        return batch["input_ids"]

    def blocks(self, model):
        return bert_blocks(model)

    def seed_stage(self, batch, stage: int) -> None:
        """Dropout masks keyed by (batch, stage): a resumed pipeline run draws the same ones."""
        import torch
        if "dropout_seed" in batch:
            torch.manual_seed((int(batch["dropout_seed"][0]) * 1009 + stage) % 2**63)

def bert_blocks(model) -> list:
    """BertForMaskedLM as an ordered sequence for pipeline stages: embeddings, each encoder layer, MLM head.

    Each block is called as block(x, batch): the embeddings take the token ids, encoder layers the hidden
    states plus the batch's attention mask, the head scores the masked positions only (as MaskedLM does).
    The head's decoder weight is tied to the word embeddings: the pipeline runtime sums its gradient
    across the two stages that hold it."""
    from torch import nn
    from transformers.masking_utils import create_bidirectional_mask

    class Block(nn.Module):
        def __init__(self, fn, *modules):
            super().__init__()
            self.fn, self.parts = fn, nn.ModuleList(modules)

        def forward(self, x, batch=None):
            return self.fn(x, batch)

    bert = model.bert

    def embed(ids, batch):
        return bert.embeddings(input_ids=ids, token_type_ids=batch["token_type_ids"])

    def layer_fn(layer):
        def run(hidden, batch):
            # transformers' public mask builder: the form (additive, boolean or None) suits the model's
            # attention implementation, exactly as BertModel.forward builds it.
            mask = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden,
                                             attention_mask=batch["attention_mask"])
            out = layer(hidden, mask)
            return out[0] if isinstance(out, tuple) else out
        return run

    def head(hidden, batch):
        return model.cls(hidden[batch["labels"] != -100])

    blocks = [("embeddings", Block(embed, bert.embeddings))]
    blocks += [(f"encoder.layer.{i}", Block(layer_fn(layer), layer)) for i, layer in enumerate(bert.encoder.layer)]
    blocks.append(("head", Block(head, model.cls)))
    return blocks
