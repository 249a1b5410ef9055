"""Text for BERT: raw .txt/.txt.gz -> WordPiece -> fixed-length token shards -> MLM samples.

Framework-neutral: numpy, `tokenizers` and the standard library only, never torch or tensorflow.

    python -m hpctrain.data.text prepare --input corpus/ --output runs/corpus [--vocab-size 8000]
        [--seq-len 128] [--vocab vocab.txt | --tokenizer tokenizer.json] [--workers N]

Output directory (the corpus format, see docs/bert.md):
    shard-00000.npy ...   uint16 (vocab <= 65535) or int32 arrays of shape (sequences, seq_len); each row
                          is `[CLS] tokens... [SEP]`, the last row of the corpus padded with [PAD]
    tokenizer.json, vocab.txt
    manifest.json         written last and atomically: a directory without it is not a prepared corpus

A re-run with the same inputs (paths, sizes, mtimes) and options reuses the output and says so.

`MLMSource` reads sequences from the memory-mapped shards by key `(index, epoch)` and applies dynamic
masking drawn from `np.random.default_rng([seed, epoch, index, 3])`: a sequence gets the same mask
whatever the rank count, loader workers or a mid-epoch resume, and a new mask each epoch.
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from hpctrain.errors import DataError
from hpctrain.files import atomic_write, sha256_file

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
IGNORE = -100  # label of unmasked positions (PyTorch / Hugging Face convention)
_MASK_STREAM = 3  # 4th seed word: keeps the masking stream apart from other per-sample streams

Log = Callable[[str], object]


# ---- reading raw text ------------------------------------------------------------------------------
def find_text_files(inputs: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith((".txt", ".txt.gz")))
            if not found:
                raise DataError(f"empty corpus: {item} holds no .txt or .txt.gz files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {item!r} does not exist")
    if not files:
        raise DataError("empty corpus: no input files given")
    return [f.resolve() for f in files]


def read_text(path: Path) -> str:
    """The file's text; DataError for binary (NUL bytes) or non-UTF-8 content."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if b"\x00" in raw:
        raise DataError(f"{path}: binary file (contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None


def _lines(files: list[Path]) -> Iterable[str]:
    for f in files:
        for line in read_text(f).splitlines():
            if line.strip():
                yield line


# ---- tokenizer -------------------------------------------------------------------------------------
def train_tokenizer(files: list[Path], vocab_size: int):
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(_lines(files), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    return tok


def load_tokenizer(vocab: str | None = None, tokenizer: str | None = None):
    from tokenizers import BertWordPieceTokenizer, Tokenizer
    try:
        if vocab:
            return BertWordPieceTokenizer(vocab, lowercase=True)
        return Tokenizer.from_file(tokenizer)
    except Exception as e:  # tokenizers raises plain Exceptions for bad files
        raise DataError(f"cannot load tokenizer from {vocab or tokenizer}: {e}") from None


def special_ids(tok) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise DataError(f"tokenizer lacks special token(s) {', '.join(missing)} (needs all of "
                        f"{', '.join(SPECIAL_TOKENS)})")
    return ids


# ---- tokenizing and packing -----------------------------------------------------------------------
def _tokenize_file(args: tuple[str, str]) -> np.ndarray:
    """Worker: the file's token ids (no specials), lines concatenated in order."""
    path, tokenizer_json = args
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    lines = [line for line in read_text(Path(path)).splitlines() if line.strip()]
    out = [np.asarray(e.ids, np.int32) for e in tok.encode_batch(lines, add_special_tokens=False)]
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def pack(tokens: np.ndarray, seq_len: int, cls: int, sep: int, pad: int) -> np.ndarray:
    """Cut a token stream into rows `[CLS] seq_len-2 tokens [SEP]`; the last row is padded with [PAD]."""
    body = seq_len - 2
    n = -(-len(tokens) // body)
    rows = np.full((n, seq_len), pad, np.int64)
    rows[:, 0] = cls
    for i in range(n):
        chunk = tokens[i * body:(i + 1) * body]
        rows[i, 1:1 + len(chunk)] = chunk
        rows[i, 1 + len(chunk)] = sep
    return rows


def _fingerprint(files: list[Path], options: dict) -> dict:
    return {"format": FORMAT_VERSION, "options": options,
            "inputs": [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]}


def prepare(inputs: list[str], output: str, vocab_size: int = 8000, seq_len: int = 128, vocab: str | None = None,
            tokenizer: str | None = None, workers: int = 0, shard_sequences: int = 65536,
            log: Log = print, progress: bool | None = None) -> dict:
    """Prepare (or reuse) a token-shard corpus in `output`; returns its manifest."""
    if seq_len < 8:
        raise DataError(f"--seq-len {seq_len}: must be at least 8")
    files = find_text_files(inputs)
    out = Path(output)
    options = {"vocab_size": vocab_size if not (vocab or tokenizer) else None, "seq_len": seq_len,
               "vocab": str(Path(vocab).resolve()) if vocab else None,
               "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None}
    fp = _fingerprint(files, options)
    old = _reusable(out, fp)
    if old is not None:
        log(f"prepare: reusing {out} (inputs and options unchanged: {old['num_sequences']} sequences)")
        return old
    # Check every file first (binary/undecodable/empty): a bad input fails before anything is written.
    if sum(len(read_text(f).strip()) for f in files) == 0:
        raise DataError(f"empty corpus: the {len(files)} input file(s) hold no text")
    if vocab or tokenizer:
        tok = load_tokenizer(vocab, tokenizer)
        log(f"prepare: tokenizer from {vocab or tokenizer}")
    else:
        log(f"prepare: training a WordPiece tokenizer (vocab {vocab_size}) on {len(files)} file(s)")
        tok = train_tokenizer(files, vocab_size)
    specials = special_ids(tok)
    if tok.post_processor is None:  # encode() of the saved tokenizer adds [CLS] ... [SEP] as BERT expects
        from tokenizers.processors import BertProcessing
        tok.post_processor = BertProcessing(("[SEP]", specials["[SEP]"]), ("[CLS]", specials["[CLS]"]))
    vsize, tok_json = tok.get_vocab_size(), tok.to_str()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory is not a complete corpus
    atomic_write(out / TOKENIZER_FILE, lambda fh: fh.write(tok_json.encode()))
    id_to_token = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    atomic_write(out / VOCAB_FILE, lambda fh: fh.write("".join(t + "\n" for t, _ in id_to_token).encode()))
    show = sys.stderr.isatty() if progress is None else progress
    tokens = _tokenize_files(files, tok_json, workers or min(len(files), os.cpu_count() or 1), show)
    rows = pack(tokens, seq_len, specials["[CLS]"], specials["[SEP]"], specials["[PAD]"])
    dtype = np.uint16 if vsize <= np.iinfo(np.uint16).max + 1 else np.int32
    rows = rows.astype(dtype)
    shards = _write_shards(out, rows, shard_sequences)
    manifest = {"format": FORMAT_VERSION, "vocab_size": int(vsize), "seq_len": seq_len, "dtype": np.dtype(dtype).name,
                "special_tokens": specials, "num_sequences": int(len(rows)), "num_tokens": int(len(tokens)),
                "shards": shards, "tokenizer": TOKENIZER_FILE, "vocab": VOCAB_FILE, "fingerprint": fp}
    atomic_write(out / MANIFEST, lambda fh: fh.write(json.dumps(manifest, indent=1).encode()))
    log(f"prepare: wrote {len(rows)} sequences x {seq_len} tokens ({len(tokens)} tokens, vocab {vsize}) "
        f"in {len(shards)} shard(s) to {out}")
    return manifest


def _reusable(out: Path, fingerprint: str) -> dict | None:
    """The manifest of a complete corpus in `out` prepared from the same inputs and options, else None."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        old = json.loads((out / MANIFEST).read_text())
    except ValueError:
        return None
    complete = all((out / s["file"]).is_file() for s in old.get("shards", []))
    return old if old.get("fingerprint") == fingerprint and complete else None


def _tokenize_files(files: list[Path], tok_json: str, workers: int, show: bool) -> np.ndarray:
    """Every file's token ids, in file order, in one stream (spawned worker processes for several files)."""
    from tqdm import tqdm
    jobs = [(str(f), tok_json) for f in files]
    if workers > 1 and len(files) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(files))) as pool:
            streams = list(tqdm(pool.imap(_tokenize_file, jobs), total=len(jobs), desc="tokenize", disable=not show))
    else:
        streams = [_tokenize_file(job) for job in tqdm(jobs, desc="tokenize", disable=not show)]
    return np.concatenate(streams)


def _write_shards(out: Path, rows: np.ndarray, shard_sequences: int) -> list[dict]:
    for old in out.glob("shard-*.npy"):
        old.unlink()
    shards = []
    for i, start in enumerate(range(0, len(rows), shard_sequences)):
        name = f"shard-{i:05d}.npy"
        part = rows[start:start + shard_sequences]
        atomic_write(out / name, lambda fh, part=part: np.save(fh, part, allow_pickle=False))
        shards.append({"file": name, "sequences": int(len(part)), "sha256": sha256_file(out / name)})
    return shards


# ---- loading ---------------------------------------------------------------------------------------
class TokenShards:
    """The sequences of a prepared corpus, memory-mapped: `shards[i]` is row i as a numpy array."""

    def __init__(self, directory: str, verify: bool = False):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise DataError(f"{directory}: not a prepared corpus (no {MANIFEST}; run "
                            "`python -m hpctrain.data.text prepare`)")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        m = self.manifest
        self.vocab_size, self.seq_len = int(m["vocab_size"]), int(m["seq_len"])
        self.special = {k: int(v) for k, v in m["special_tokens"].items()}
        for s in m["shards"]:
            if not (self.dir / s["file"]).is_file():
                raise DataError(f"{self.dir / s['file']}: shard listed in the manifest is missing")
        if verify:
            self.verify()
        self.counts = np.array([s["sequences"] for s in m["shards"]], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._maps: dict[int, np.ndarray] = {}

    def verify(self) -> None:
        for s in self.manifest["shards"]:
            if sha256_file(self.dir / s["file"]) != s["sha256"]:
                raise DataError(f"{self.dir / s['file']}: checksum mismatch (corrupt or modified shard)")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:  # opened lazily: each loader worker maps only the shards it reads
            self._maps[k] = np.load(self.dir / self.manifest["shards"][k]["file"], mmap_mode="r")
        return self._maps[k]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range 0..{len(self) - 1}")
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        return np.asarray(self._shard(k)[i - self.starts[k]])

    def __getstate__(self):  # mmaps are reopened in each worker rather than pickled
        return {**self.__dict__, "_maps": {}}


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, mask_prob: float, mask_id: int,
                special: np.ndarray, normal_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BERT dynamic masking: choose mask_prob of the non-special tokens; of those 80% -> [MASK],
    10% -> a random non-special token, 10% unchanged. Returns (input_ids, labels)."""
    ids = ids.astype(np.int64)
    n = len(ids)
    choose, kind, random_tok = rng.random(n), rng.random(n), normal_ids[rng.integers(0, len(normal_ids), n)]
    candidate = ~np.isin(ids, special)
    masked = candidate & (choose < mask_prob)
    if mask_prob > 0 and not masked.any() and candidate.any():
        masked[np.flatnonzero(candidate)[np.argmin(choose[candidate])]] = True  # >= 1 target per sequence
    labels = np.where(masked, ids, IGNORE)
    out = ids.copy()
    out[masked & (kind < 0.8)] = mask_id
    swap = masked & (kind >= 0.8) & (kind < 0.9)
    out[swap] = random_tok[swap]
    return out, labels


class MLMSource:
    """Sequences [offset, offset+length) of a prepared corpus as MLM samples, keyed by (index, epoch).

    Returns a dict of int64 numpy arrays: input_ids, attention_mask, token_type_ids, labels (-100 where
    not masked), and dropout_seed (one int per sample, from the same key, so the model's dropout is
    reproducible on resume too)."""

    def __init__(self, shards: TokenShards, seed: int, mask_prob: float = 0.15, offset: int = 0,
                 length: int | None = None):
        self.shards, self.seed, self.mask_prob = shards, seed, mask_prob
        self.offset = offset
        self.length = len(shards) - offset if length is None else length
        sp = shards.special
        self.special = np.array(sorted(sp.values()), np.int64)
        self.normal_ids = np.setdiff1d(np.arange(shards.vocab_size), self.special)
        self.mask_id, self.pad_id = sp["[MASK]"], sp["[PAD]"]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> dict:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        if not 0 <= index < self.length:
            raise IndexError(f"sample index {index} out of range 0..{self.length - 1}")
        ids = self.shards[self.offset + int(index)]
        rng = np.random.default_rng([self.seed, int(epoch), self.offset + int(index), _MASK_STREAM])
        inputs, labels = mask_tokens(ids, rng, self.mask_prob, self.mask_id, self.special, self.normal_ids)
        return {"input_ids": inputs, "attention_mask": (ids != self.pad_id).astype(np.int64),
                "token_type_ids": np.zeros(len(ids), np.int64), "labels": labels,
                "dropout_seed": np.int64(rng.integers(0, 2**62))}


# ---- CLI -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpctrain.data.text", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="raw .txt/.txt.gz -> WordPiece -> token shards + manifest.json")
    pp.add_argument("--input", nargs="+", required=True,
                    help="text files or directories (searched for *.txt, *.txt.gz)")
    pp.add_argument("--output", required=True, help="output directory")
    pp.add_argument("--vocab-size", type=int, default=8000, help="WordPiece vocabulary size when training one")
    pp.add_argument("--seq-len", type=int, default=128, help="tokens per sequence including [CLS] and [SEP]")
    g = pp.add_mutually_exclusive_group()
    g.add_argument("--vocab", help="use this WordPiece vocab.txt instead of training a tokenizer")
    g.add_argument("--tokenizer", help="use this Hugging Face tokenizer.json instead of training one")
    pp.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per core)")
    pp.add_argument("--shard-sequences", type=int, default=65536, help="sequences per shard file")
    vp = sub.add_parser("verify", help="check every shard's sha256 against manifest.json")
    vp.add_argument("directory")
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare(args.input, args.output, args.vocab_size, args.seq_len, args.vocab, args.tokenizer,
                    args.workers, args.shard_sequences)
        else:
            s = TokenShards(args.directory, verify=True)
            print(f"{args.directory}: {len(s)} sequences, all {len(s.manifest['shards'])} shard checksums match")
    except DataError as e:
        print(f"hpctrain.data.text: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
