"""BERT masked-language-model pretraining on the built-in corpus or prepared token shards; after
training the model is exported in Hugging Face format (run_dir/hf)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from hpctrain.config import BertTrainConfig
from hpctrain.data.text import DataError, MLMSource, TokenShards
from hpctrain.files import atomic_replace_dir
from hpctrain.recipes.base import Data, Recipe, World


def open_corpus(d, world: World) -> TokenShards:
    """Rank 0 prepares the built-in corpus if needed; the others wait for its verdict (a broadcast)."""
    error = None
    if d.corpus == "builtin" and world.rank == 0:
        from hpctrain.data.corpus import prepare_builtin
        try:
            prepare_builtin(d.corpus_cache, d.vocab_size, d.seq_len)
        except DataError as e:
            error = str(e)
    error = world.broadcast_object(error)  # every rank learns rank 0's outcome before reading
    if error:
        raise DataError(error)
    return TokenShards(d.corpus_cache if d.corpus == "builtin" else d.corpus, verify=world.rank == 0)


def load_model(m, shards: TokenShards):
    """A preset built for the corpus' vocabulary, or a Hugging Face model directory checked against it."""
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
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar: not a training log line

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(shards.dir / "tokenizer.json"), unk_token="[UNK]",
                                      pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        tok.save_pretrained(tmp)
        shutil.copy(shards.dir / "vocab.txt", tmp / "vocab.txt")
        (tmp / "corpus_manifest.json").write_text(json.dumps(shards.manifest, indent=1))

    out = Path(run_dir) / "hf"
    atomic_replace_dir(out, build)
    return out


class Bert(Recipe):
    name = "bert"
    config_cls = BertTrainConfig

    def data(self, cfg, world: World) -> Data:
        d = cfg.data
        shards = open_corpus(d, world)
        n_val = int(len(shards) * d.val_fraction)
        train = MLMSource(shards, cfg.run.seed, d.mask_prob, 0, len(shards) - n_val)
        val = MLMSource(shards, cfg.run.seed, d.mask_prob, len(shards) - n_val, n_val) if n_val else None
        if len(train) < world.data_size:
            raise DataError(f"corpus {shards.dir}: {len(train)} training sequences for {world.data_size} replicas")
        # Contiguous ranges: each rank reads only its own slice of the memory-mapped shards.
        return Data(train, val, contiguous=True, info={"shards": shards})

    def describe(self, cfg, data: Data, params: int) -> str:
        shards = data.info["shards"]
        return (f"BERT {cfg.model.model_path or cfg.model.preset} ({params / 1e6:.1f}M params), {len(shards)} "
                f"sequences x {shards.seq_len} tokens")

    def signature(self, cfg, data: Data | None = None) -> dict:
        model = {"model_path": cfg.model.model_path} if cfg.model.model_path else {"preset": cfg.model.preset}
        if data is None:
            return model
        shards = data.info["shards"]
        return {**model, "vocab_size": shards.vocab_size, "seq_len": shards.seq_len}

    def torch_model(self, cfg, data: Data):
        return load_model(cfg.model, data.info["shards"])

    def torch_task(self, cfg):
        from hpctrain.models.bert import MaskedLM
        return MaskedLM()

    def torch_after(self, trainer, cfg) -> None:
        if trainer.cluster.rank == 0:
            out = save_hf(trainer.whole_model(), trainer.data.info["shards"], cfg.run.run_dir)
            trainer.log(f"{self.prog}: saved Hugging Face model to {out}")


    def tf_model(self, cfg, data: Data):
        from hpctrain.models.tf.bert import build_bert
        shards = data.info["shards"]
        return build_bert(cfg.model.preset, shards.vocab_size, shards.seq_len, cfg.model.dropout)

    def tf_task(self, cfg):
        from hpctrain.models.tf.bert import MaskedLM
        return MaskedLM()

    def tf_after(self, trainer, cfg) -> None:
        """The Keras model (run_dir/keras/model.keras) with the corpus' vocabulary, swapped in whole."""
        if trainer.cluster.rank != 0:
            return
        shards = trainer.data.info["shards"]

        def build(tmp: Path) -> None:
            trainer.whole_model().save(tmp / "model.keras")
            for name in ("vocab.txt", "tokenizer.json"):
                shutil.copy(shards.dir / name, tmp / name)
            (tmp / "corpus_manifest.json").write_text(json.dumps(shards.manifest, indent=1))

        out = Path(cfg.run.run_dir) / "keras"
        atomic_replace_dir(out, build)
        trainer.log(f"{self.prog}: saved Keras model to {out}")


RECIPE = Bert()
