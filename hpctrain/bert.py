"""BERT MLM pretraining: `python -m hpctrain.bert [--config FILE] [flags]` under any launcher."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from hpctrain import cli
from hpctrain.config import BertTrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.data.text import DataError, MLMSource, TokenShards

PROG = "hpctrain.bert"


def open_corpus(d, rank: int, backend) -> TokenShards:
    """Rank 0 prepares the built-in corpus if needed; the others wait for its verdict (a broadcast)."""
    error = None
    if d.corpus == "builtin" and rank == 0:
        from hpctrain.data.corpus import prepare_builtin
        try:
            prepare_builtin(d.corpus_cache, d.vocab_size, d.seq_len)
        except DataError as e:
            error = str(e)
    error = backend.broadcast_object(error)  # Horovod: every rank learns rank 0's outcome before reading
    if error:
        raise DataError(error)
    return TokenShards(d.corpus_cache if d.corpus == "builtin" else d.corpus, verify=rank == 0)


def build_model(m, shards: TokenShards):
    from hpctrain.models.bert import build_bert, load_bert
    if not m.model_path:
        return build_bert(m.preset, shards.vocab_size, shards.seq_len, shards.special["[PAD]"], m.dropout)
    if not (Path(m.model_path) / "config.json").is_file():
        raise DataError(f"model.model_path (--model-path): {m.model_path!r} is not a Hugging Face model directory")
    try:
        model = load_bert(m.model_path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' errors for a directory it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"model.model_path (--model-path): {m.model_path!r} could not be loaded as a BERT "
                        f"model: {first}") from None
    if model.config.vocab_size != shards.vocab_size:
        raise DataError(f"vocab mismatch: corpus {shards.dir} has vocab {shards.vocab_size}, model "
                        f"{m.model_path} has {model.config.vocab_size}")
    if shards.seq_len > model.config.max_position_embeddings:
        raise DataError(f"seq len {shards.seq_len} of corpus {shards.dir} exceeds the model's max positions "
                        f"{model.config.max_position_embeddings} ({m.model_path})")
    return model


def save_hf(model, shards: TokenShards, run_dir: str) -> Path:
    """model.save_pretrained + tokenizer files into run_dir/hf, swapped in whole (never half-written)."""
    from transformers import PreTrainedTokenizerFast
    out, tmp = Path(run_dir) / "hf", Path(run_dir) / ".hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(shards.dir / "tokenizer.json"), unk_token="[UNK]",
                                  pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(tmp)
    shutil.copy(shards.dir / "vocab.txt", tmp / "vocab.txt")
    (tmp / "corpus_manifest.json").write_text(json.dumps(shards.manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build(cfg, cluster):
    from hpctrain.engine.torch import make_loader, make_trainer, setup  # torch loads after arg checks
    from hpctrain.models.bert import MaskedLM
    rt = setup(cfg, cluster)
    d = cfg.data
    shards = open_corpus(d, cluster.rank, rt.backend)
    n_val = int(len(shards) * d.val_fraction)
    train_src = MLMSource(shards, cfg.run.seed, d.mask_prob, 0, len(shards) - n_val)
    val_src = MLMSource(shards, cfg.run.seed, d.mask_prob, len(shards) - n_val, n_val) if n_val else None
    if len(train_src) < rt.data_size:
        raise DataError(f"corpus {shards.dir}: {len(train_src)} training sequences for {rt.data_size} replicas")
    # Contiguous ranges: each rank reads only its own slice of the memory-mapped shards.
    train_sampler = ShardedBatchSampler(len(train_src), rt.data_rank, rt.data_size, d.batch_size, cfg.run.seed,
                                        contiguous=True)
    model = build_model(cfg.model, shards)
    val_loader = None
    if val_src is not None:
        val_loader = make_loader(val_src, ShardedBatchSampler(len(val_src), rt.data_rank, rt.data_size,
                                                              d.eval_batch_size or d.batch_size, cfg.run.seed,
                                                              shuffle=False, drop_last=False, pad=False),
                                 d.workers, rt.device)
    trainer = make_trainer(model, make_loader(train_src, train_sampler, d.workers, rt.device), val_loader, rt,
                           cfg, MaskedLM())
    trainer.shards = shards  # for the Hugging Face export after training
    trainer.log(f"{PROG}: BERT {cfg.model.model_path or cfg.model.preset} "
                f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), {len(shards)} sequences x "
                f"{shards.seq_len} tokens, {rt.backend.name} backend, device {rt.device}, "
                f"{rt.threads} thread(s) per rank, {trainer.steps_per_epoch} steps/epoch")
    trainer.resume()
    return trainer


def export_hf(trainer, cfg, result) -> None:
    if trainer.cluster.rank == 0:
        out = save_hf(trainer.backend.unwrap(trainer.model), trainer.shards, cfg.run.run_dir)
        trainer.log(f"{PROG}: saved Hugging Face model to {out}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(PROG, argv, build, BertTrainConfig, after=export_hf)


if __name__ == "__main__":
    sys.exit(main())
