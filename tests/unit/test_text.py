"""Text preparation, token shards, rank ranges and MLM masking (framework-neutral: no torch)."""
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.data.text import IGNORE, DataError, MLMSource, TokenShards, prepare
from tests.launch import ROOT, env

WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly judge boxing matches and "
         "pack my box with five dozen liquor jugs sphinx of black quartz judge vow").split()


def write_corpus(root: Path, lines: int = 1500, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    text = ["".join(" ".join(rng.choice(WORDS, rng.integers(4, 14))) + ".") for _ in range(lines)]
    third = lines // 3
    (root / "a.txt").write_text("\n".join(text[:third]) + "\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "b.txt").write_text("\n".join(text[third:2 * third]) + "\n")
    (root / "c.txt.gz").write_bytes(gzip.compress(("\n".join(text[2 * third:]) + "\n").encode()))
    (root / "ignored.bin").write_bytes(b"\x00\x01")  # not *.txt: never read
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    src = write_corpus(base / "raw")
    logs = []
    manifest = prepare([str(src)], str(base / "out"), vocab_size=300, seq_len=32, workers=2, log=logs.append)
    return base, src, base / "out", manifest, logs


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hpctrain.data.text", *args], capture_output=True, text=True,
                          env=env(), cwd=cwd, timeout=120)


def test_module_never_imports_torch(tmp_path):
    src = write_corpus(tmp_path / "raw", lines=200)
    code = ("import sys; from hpctrain.data.text import prepare, MLMSource, TokenShards; import hpctrain.data.corpus; "
            f"prepare([{str(src)!r}], {str(tmp_path / 'o')!r}, vocab_size=200, seq_len=16, workers=2); "
            f"s = MLMSource(TokenShards({str(tmp_path / 'o')!r}), 0); s[(0, 0)]; "
            "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules, 'framework imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr


def test_tokenizer_round_trip(corpus):
    from tokenizers import Tokenizer
    _, _, out, manifest, _ = corpus
    tok = Tokenizer.from_file(str(out / manifest["tokenizer"]))
    text = "the Quick brown fox jumps over the lazy dog."
    enc = tok.encode(text)
    assert enc.ids[0] == manifest["special_tokens"]["[CLS]"] and enc.ids[-1] == manifest["special_tokens"]["[SEP]"]
    assert tok.decode(enc.ids) == text.lower().replace(".", " .").replace(" .", ".")
    vocab = (out / "vocab.txt").read_text().splitlines()
    assert len(vocab) == manifest["vocab_size"] and vocab[manifest["special_tokens"]["[MASK]"]] == "[MASK]"


def test_shard_format_manifest_and_checksums(corpus, tmp_path):
    _, src, out, manifest, _ = corpus
    sp = manifest["special_tokens"]
    assert manifest["seq_len"] == 32 and manifest["dtype"] == "uint16"
    assert [i["path"] for i in manifest["fingerprint"]["inputs"]] == sorted(
        str(p.resolve()) for p in [src / "a.txt", src / "c.txt.gz", src / "sub" / "b.txt"])
    arrays = [np.load(out / s["file"], mmap_mode="r") for s in manifest["shards"]]
    assert all(isinstance(a, np.memmap) and a.dtype == np.uint16 and a.shape[1] == 32 for a in arrays)
    rows = np.concatenate(arrays)
    assert len(rows) == manifest["num_sequences"] == sum(s["sequences"] for s in manifest["shards"])
    assert (rows[:, 0] == sp["[CLS]"]).all() and ((rows == sp["[SEP]"]).sum(1) == 1).all()
    assert (rows[:-1, -1] == sp["[SEP]"]).all()  # all rows but the last are full
    body = rows[(rows != sp["[CLS]"]) & (rows != sp["[SEP]"]) & (rows != sp["[PAD]"])]
    assert len(body) == manifest["num_tokens"] and body.max() < manifest["vocab_size"]
    TokenShards(str(out), verify=True)
    assert _cli("verify", str(out)).returncode == 0

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last sequence
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        TokenShards(str(bad), verify=True)
    p = _cli("verify", str(bad))
    assert p.returncode == 2 and "checksum mismatch" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_sequence_in_exactly_one_rank_range(corpus, size):
    _, _, out, manifest, _ = corpus
    shards = TokenShards(str(out))
    n = len(shards)
    samplers = [ShardedBatchSampler(n, r, size, 4, seed=5, contiguous=True) for r in range(size)]
    owned = [set(range(*s.rank_range())) for s in samplers]
    assert sorted(i for o in owned for i in o) == list(range(n))  # each sequence in exactly one range
    tokens = sum(int((shards[i] != manifest["special_tokens"]["[PAD]"]).sum()) for o in owned for i in o)
    assert tokens == manifest["num_tokens"] + 2 * n  # each token too (+ [CLS]/[SEP] per row)
    assert len({len(s) for s in samplers}) == 1 and len(samplers[0]) == (n // size) // 4  # equal batch counts
    for s, o in zip(samplers, owned):
        s.set_epoch(0)
        e0 = [i for b in s for i, _ in b]
        s.set_epoch(1)
        e1 = [i for b in s for i, _ in b]
        assert set(e0) <= o and set(e1) <= o and len(set(e0)) == len(e0)  # stays in its range, no repeats
        assert e0 != e1  # reshuffled per epoch
        s.set_epoch(1, skip_batches=2)
        assert [i for b in s for i, _ in b] == e1[8:]


def test_masking_statistics_and_determinism(corpus):
    _, _, out, manifest, _ = corpus
    sp = manifest["special_tokens"]
    src = MLMSource(TokenShards(str(out)), seed=3, mask_prob=0.15)
    special = np.array(list(sp.values()))
    n_cand = n_masked = n_mask_tok = n_same = n_random = 0
    for epoch in range(4):
        for i in range(len(src)):
            s = src[(i, epoch)]
            orig = TokenShards.__getitem__(src.shards, i).astype(np.int64)
            is_special = np.isin(orig, special)
            masked = s["labels"] != IGNORE
            assert not (masked & is_special).any()  # specials never masked
            assert (s["input_ids"][is_special] == orig[is_special]).all()
            assert (s["labels"][masked] == orig[masked]).all()
            assert (s["attention_mask"] == (orig != sp["[PAD]"])).all()
            n_cand += int((~is_special).sum())
            n_masked += int(masked.sum())
            n_mask_tok += int((s["input_ids"][masked] == sp["[MASK]"]).sum())
            n_same += int((s["input_ids"][masked] == orig[masked]).sum())
            n_random += int(((s["input_ids"][masked] != orig[masked]) & (s["input_ids"][masked] != sp["[MASK]"])).sum())
    assert n_masked > 5000
    assert n_masked / n_cand == pytest.approx(0.15, abs=0.01)
    assert n_mask_tok / n_masked == pytest.approx(0.8, abs=0.02)
    assert n_same / n_masked == pytest.approx(0.1, abs=0.02)
    assert n_random / n_masked == pytest.approx(0.1, abs=0.02)
    a, b = src[(7, 2)], MLMSource(TokenShards(str(out)), seed=3)[(7, 2)]
    assert all((a[k] == b[k]).all() for k in a)  # same key -> same sample, fresh process state
    assert not (a["labels"] == src[(7, 3)]["labels"]).all()  # new mask next epoch
    assert not (a["labels"] == MLMSource(src.shards, seed=4)[(7, 2)]["labels"]).all()  # and per seed


def test_rerun_reuses_output_and_input_change_redoes(corpus):
    base, src, out, manifest, logs = corpus
    shard = out / manifest["shards"][0]["file"]
    before = shard.stat().st_mtime_ns
    p = _cli("prepare", "--input", str(src), "--output", str(out), "--vocab-size", "300", "--seq-len", "32")
    assert p.returncode == 0 and "reusing" in p.stdout, p.stdout + p.stderr
    assert shard.stat().st_mtime_ns == before
    p = _cli("prepare", "--input", str(src), "--output", str(out), "--vocab-size", "300", "--seq-len", "64")
    assert p.returncode == 0 and "reusing" not in p.stdout
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 64
    # a given vocab: the same ids as the tokenizer that wrote it
    p = _cli("prepare", "--input", str(src), "--output", str(base / "v"), "--vocab", str(out / "vocab.txt"),
             "--seq-len", "64")
    assert p.returncode == 0, p.stderr
    assert (np.load(base / "v" / "shard-00000.npy") == np.load(out / "shard-00000.npy")).all()


@pytest.mark.parametrize("kind, words", [("empty_dir", "empty corpus"), ("blank", "empty corpus"),
                                         ("nul", "binary file"), ("latin1", "not UTF-8"),
                                         ("missing", "does not exist"), ("no_mask_tokenizer", "lacks special token")])
def test_bad_input_one_line_exit_2_nothing_half_written(tmp_path, kind, words):
    inp = tmp_path / "in"
    inp.mkdir()
    good = write_corpus(tmp_path / "good", lines=100)
    if kind == "blank":
        (inp / "a.txt").write_text("\n   \n\t\n")
    elif kind == "nul":
        (inp / "a.txt").write_text("fine text\n")
        (inp / "b.txt").write_bytes(b"looks like text\x00\x00\x01\x02")
    elif kind == "latin1":
        (inp / "a.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    elif kind == "missing":
        inp = tmp_path / "nope"
    extra = []
    if kind == "no_mask_tokenizer":
        inp = good
        (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\nfox\n")
        extra = ["--vocab", str(tmp_path / "v.txt")]
    fresh = tmp_path / "fresh"
    p = _cli("prepare", "--input", str(inp), "--output", str(fresh), *extra)
    assert p.returncode == 2 and not (fresh / "manifest.json").exists()
    with pytest.raises(DataError, match="not a prepared corpus"):
        TokenShards(str(fresh))
    # A failed re-prepare leaves a good corpus in the same place untouched.
    out = tmp_path / "out"
    assert _cli("prepare", "--input", str(good), "--output", str(out), "--vocab-size", "200").returncode == 0
    p = _cli("prepare", "--input", str(inp), "--output", str(out), "--vocab-size", "200", *extra)
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode == 2 and len(errors) == 1 and words in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert len(TokenShards(str(out), verify=True)) > 0
