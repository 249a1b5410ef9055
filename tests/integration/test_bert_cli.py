"""End to end through `python -m hpctrain.bert`: real launchers, real token shards, real files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.launch import check_ok, metrics, run

BERT = ["-m", "hpctrain.bert", "--config", "configs/bert_tiny.toml", "--progress", "never"]


def test_horovodrun_builtin_corpus_loss_falls_and_saves_hf(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "corpus-builtin"
    out = check_ok(run("horovodrun", 2, [*BERT, "--corpus-cache", str(cache), "--seq-len", "64", "--batch-size", "16",
                                    "--max-steps", "40", "--log-every", "5", "--lr", "0.002", "--fp16-allreduce",
                                    "--run-dir", str(run_dir)], timeout=300))
    assert out.count("done at step 40") == 1  # only rank 0 reports
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["seq_len"] == 64 and manifest["num_sequences"] > 1000
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[0]["loss"] > 7.0 and train[-1]["loss"] < train[0]["loss"] - 1.0, [r["loss"] for r in train]
    assert train[-1]["samples_per_s_total"] > train[-1]["samples_per_s_rank"] > 0
    assert (run_dir / "checkpoints" / "ckpt-00000040.pt").is_file()  # training completed to the final step
    from transformers import BertForMaskedLM, PreTrainedTokenizerFast
    model = BertForMaskedLM.from_pretrained(run_dir / "hf", local_files_only=True)
    tok = PreTrainedTokenizerFast.from_pretrained(run_dir / "hf", local_files_only=True)
    assert model.config.vocab_size == manifest["vocab_size"] == len(tok)
    ids = tok("return the [MASK] of the list.", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == manifest["special_tokens"]["[CLS]"]
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == manifest["vocab_size"]
    # a second run reuses the prepared corpus
    out = check_ok(run("single", 1, [*BERT, "--backend", "none", "--corpus-cache", str(cache), "--seq-len", "64",
                                "--max-steps", "1", "--run-dir", str(tmp_path / "r2")]))
    assert "reusing" in out


def test_resume_mid_epoch_reproduces_uninterrupted_run(tmp_path, small_corpus):
    # 8 steps per epoch, 2 epochs; the interrupted run stops at step 5 (mid-epoch), resumes with another
    # worker count and crosses the epoch boundary. Dropout stays on: it is seeded from the sample keys.
    common = [*BERT, "--corpus", str(small_corpus), "--batch-size", "8", "--val-fraction", "0", "--epochs", "2",
              "--log-every", "1", "--checkpoint-every", "5", "--deterministic"]
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(run("mpirun", 2, [*common, "--run-dir", str(a), "--workers", "2"]))
    check_ok(run("mpirun", 2, [*common, "--run-dir", str(b), "--workers", "0", "--max-steps", "5"]))
    out = check_ok(run("mpirun", 2, [*common, "--run-dir", str(b), "--workers", "1", "--resume", "auto"]))
    assert "at step 5" in out and "resumed from" in out
    full = {r["step"]: r["loss"] for r in metrics(a, "train")}
    resumed = {r["step"]: r["loss"] for r in metrics(b, "train")}
    assert sorted(full) == list(range(1, 17)) and sorted(resumed) == list(range(1, 17))
    assert [resumed[s] for s in range(6, 17)] == pytest.approx([full[s] for s in range(6, 17)], rel=1e-6, abs=1e-7)
    assert full[16] < full[1]
    fa = torch.load(a / "checkpoints" / "ckpt-00000016.pt", weights_only=True)["model"]
    fb = torch.load(b / "checkpoints" / "ckpt-00000016.pt", weights_only=True)["model"]
    diff = max((fa[k].double() - fb[k].double()).abs().max().item() for k in fa)
    assert diff < 1e-5, f"final parameters differ by {diff}"


def _hf_model(path: Path, vocab: int, positions: int) -> Path:
    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=positions)).save_pretrained(path)
    return path


@pytest.mark.parametrize("case, words", [("no_corpus", "not a prepared corpus"), ("vocab", "vocab mismatch"),
                                         ("positions", "exceeds the model's max positions"),
                                         ("not_model", "is not a Hugging Face model directory"),
                                         ("batch", "not one step per epoch")])
def test_bad_input_one_line_exit_2(tmp_path, small_corpus, case, words):
    vocab = json.loads((small_corpus / "manifest.json").read_text())["vocab_size"]
    argv = {"no_corpus": lambda: ["--corpus", str(tmp_path)],
            "vocab": lambda: ["--model-path", str(_hf_model(tmp_path / "m", vocab + 1, 64))],
            "positions": lambda: ["--model-path", str(_hf_model(tmp_path / "m", vocab, 16))],
            "not_model": lambda: ["--model-path", str(tmp_path)],
            "batch": lambda: ["--batch-size", "4096"]}[case]()
    corpus = [] if case == "no_corpus" else ["--corpus", str(small_corpus)]
    p = run("single", 1, [*BERT, "--backend", "none", *corpus, *argv, "--run-dir", str(tmp_path / "r")], timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0], p.stderr
    assert "Traceback" not in p.stderr


def test_model_path_continues_from_saved_model(tmp_path, small_corpus):
    vocab = json.loads((small_corpus / "manifest.json").read_text())["vocab_size"]
    model = _hf_model(tmp_path / "m", vocab, 64)
    run_dir = tmp_path / "r"
    check_ok(run("single", 1, [*BERT, "--backend", "none", "--corpus", str(small_corpus), "--model-path", str(model),
                          "--max-steps", "2", "--batch-size", "8", "--run-dir", str(run_dir)]))
    cfg = json.loads((run_dir / "hf" / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["max_position_embeddings"] == 64
    assert np.isfinite([r["loss"] for r in metrics(run_dir, "train")]).all()
