"""BERT for masked-language-model pretraining (Hugging Face `transformers`): architecture only.

Presets are random-init `BertForMaskedLM`s sized by (layers, hidden, heads, intermediate); vocabulary
size and maximum positions come from the prepared corpus. `load_bert` starts from a local Hugging Face
directory instead (offline: never touches the hub).
"""
from __future__ import annotations

PRESETS = {  # layers, hidden, heads, intermediate
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}


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
        from torch.nn.functional import cross_entropy
        if model.training and "dropout_seed" in batch:
            torch.manual_seed(int(batch["dropout_seed"][0]))
        labels = batch["labels"]
        sel = labels != -100
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            logits = model(**inputs).logits[sel]
        else:
            hidden = model.bert(**inputs)[0]
            logits = model.cls(hidden[sel])
        target = labels[sel]
        count = target.numel()
        loss = cross_entropy(logits.float(), target) if count else logits.sum() * 0.0
        stats = torch.stack([loss.detach().double() * count, (logits.detach().argmax(-1) == target).sum().double(),
                             torch.tensor(float(count), dtype=torch.float64, device=labels.device)])
        return loss, stats
