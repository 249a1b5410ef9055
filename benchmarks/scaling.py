"""Training throughput at np = 1..N: hpctrain (Horovod and DDP backends) beside a minimal plain-Horovod
loop, all on synthetic data, 1 thread per rank on CPU; with `--engines tf` (or `all`) also hpctrain's
TensorFlow engine. `--model bert` runs the same rows for BERT MLM (hpctrain on its built-in corpus).

    python benchmarks/scaling.py --max-np 2 [--arch resnet18] [--image-size 64] [--steps 12] [--engines torch,tf]
    python benchmarks/scaling.py --max-np 2 --model bert [--bert-preset tiny] [--seq-len 128] [--engines all]

Scaling efficiency E(n) = T(n) / (n T(1)) on total samples/s. hpctrain's throughput is the Trainer's
own epoch figure (first 2 steps excluded, like the peer; since hpctrain.loop's fix it is taken before
the end-of-epoch checkpoint save, so the save is outside the window as it is for the peer). The plain
loop runs twice: with Horovod's default cycle time (what a user gets) and with hpctrain's CPU setting
(the like-for-like peer).

Models (`--model`):
  resnet  (default) --arch at --image-size on hpctrain's synthetic images; the peer: fixed random images.
  bert    BertForMaskedLM of --bert-preset (tiny 2x128 by default), --seq-len tokens; a sample is one
          sequence. hpctrain's rows train on hpctrain's built-in corpus (standard-library docstrings),
          prepared once before any timing into --corpus-cache (a fresh temporary directory by default;
          hpctrain's own preparation: WordPiece vocabulary 8000, --seq-len). hpctrain writes its epoch
          record only at an epoch end, so each row trains on a corpus directory holding exactly the first
          processes x replicas x batch x steps sequences of it (--val-fraction 0): one epoch = --steps
          steps. Too few sequences in the corpus is an error before anything runs. Optimizer AdamW
          (lr 1e-4 per rank, linear scaling) in hpctrain and the peer. The peer (plain_horovod.py --model
          bert) builds the same BertForMaskedLM on one fixed batch of random ids with ~15% of positions
          labelled and the corpus' vocabulary size, and scores only the labelled positions, as hpctrain's
          torch task does under Horovod; hpctrain's DDP path (and its TF engine) project every position
          onto the vocabulary, which costs BERT-tiny about as much as the encoder.
          Results go to a separate file (`scaling-bert`), with model, preset, seq_len and vocab_size.

The machine's ceiling for n ranks (`ceiling_no_comm`): the same plain step run by n processes that never
communicate (started together, timed over the same window, rates summed). Two processes on two cores
slow each other through memory bandwidth, caches and clock; that loss is the machine's, not ours.
Each torch row also gets `efficiency_vs_ceiling` = T(n) / ceiling(n): what the software controls.

Engines (`--engines`, a comma list of names or groups; default `torch`, today's five rows):
  torch  hpctrain_horovod, hpctrain_mpi (--backend mpi: one fused mpi4py Allreduce per step), hpctrain_ddp,
         plain_horovod_cycle10ms, plain_horovod_default, ceiling_no_comm
  tf     hpctrain's TensorFlow engine (`--framework tf`), the same model, data and step count:
         tf_horovod      mpirun -np n, --backend horovod, 1 intra-op thread per rank
         tf_multiworker  mpirun -np n, --backend multiworker (MultiWorkerMirroredStrategy, one worker per rank,
                         TF_CONFIG built by hpctrain on free ports; --collective auto = ring on CPU), 1 thread
                         per rank. Not run at np=1: hpctrain refuses one worker without a hand-written TF_CONFIG,
                         so its row there is null (`skipped`) and its efficiency uses tf_horovod np=1 as T(1)
                         (each row names its baseline in `efficiency_baseline`).
         tf_mirrored     ONE process, --backend mirrored --cpu-devices n (n logical CPU devices = n replicas,
                         --batch-size each) and --threads n: one process cannot give each replica its own
                         1-thread pool, so its n replicas share n intra-op threads, the same n cores the n
                         ranks of the other rows get.
  sync   the synchronization strategies (hpctrain.sync) on --backend mpi beside its plain allreduce and the ceiling:
         hpctrain_mpi, sync_local_sgd_k4 (--sync local-sgd --sync-period 4), sync_powersgd_r8 (--sync powersgd,
         rank 8, from step 2: the window's first 2 steps are the uncompressed start), sync_zero (--zero),
         sync_gossip (--sync gossip, exponential graph: one peer per step), sync_ps and sync_ps_async (--sync ps,
         the last rank a server: np-1 workers train), ceiling_no_comm. Rows of hpctrain
         also record sent_bytes_per_step: what the rank handed to its training collectives per step over the
         epoch (hpctrain's own count), and sent_vs_allreduce beside hpctrain_mpi.
  all    the torch and tf groups
efficiency_vs_ceiling is null for TF rows: the ceiling is a torch step, so that ratio would measure the
frameworks, not the communication. TF ratios (tf_*_vs_tf_horovod) compare the TF rows with each other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import save_results  # noqa: E402
from hpctrain.models.names import BERT_SIZES  # noqa: E402  (no torch, TF or transformers import)

TORCH_ENGINES = ("hpctrain_horovod", "hpctrain_mpi", "hpctrain_ddp", "plain_horovod_cycle10ms", "plain_horovod_default",
                 "ceiling_no_comm")
TF_ENGINES = ("tf_horovod", "tf_multiworker", "tf_mirrored")
SYNC_ARGS = {"sync_local_sgd_k4": ("--sync", "local-sgd", "--sync-period", "4"),
             "sync_powersgd_r8": ("--sync", "powersgd", "--powersgd-rank", "8", "--powersgd-start", "2"),
             "sync_zero": ("--zero",), "sync_gossip": ("--sync", "gossip"),
             "sync_ps": ("--sync", "ps"), "sync_ps_async": ("--sync", "ps", "--ps-mode", "async")}
NEEDS_TWO = {"sync_gossip": "gossip needs >= 2 ranks (hpctrain refuses it on one)",
             "sync_ps": "a parameter server needs >= 2 ranks (a server and a worker)",
             "sync_ps_async": "a parameter server needs >= 2 ranks (a server and a worker)"}
SYNC_ENGINES = tuple(SYNC_ARGS)
GROUPS = {"torch": TORCH_ENGINES, "tf": TF_ENGINES, "all": TORCH_ENGINES + TF_ENGINES,
          "sync": ("hpctrain_mpi", *SYNC_ENGINES, "ceiling_no_comm")}
MEASURED = {}  # (engine name, np) -> what hpctrain's own metrics say besides the rate (see hpctrain_rate)
MULTIWORKER_NP1 = "MultiWorkerMirroredStrategy needs >= 2 workers here (hpctrain refuses one without a TF_CONFIG)"


BERT_LR = 1e-4  # AdamW, per rank (hpctrain scales it linearly, the peer by hand); speed does not depend on it
BERT_VOCAB = 8000  # the WordPiece vocabulary asked of the built-in corpus (hpctrain's --vocab-size default)


class Skipped(Exception):
    """A row that cannot run at this np: recorded as null with the reason."""


def mpirun(np_: int, args: list[str], env: dict | None = None) -> str:
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable, *args]
    e = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
         "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def free_port_base(n: int) -> int:
    """A base port with base..base+n-1 free here (tf_multiworker's workers listen there; a fixed base
    collides with any other job on this machine, e.g. a test run using hpctrain's default 23456)."""
    from hpctrain.cluster import port_in_use
    for base in range(41000, 60000, 97):
        if not any(port_in_use(base + k) for k in range(n)):
            return base
    raise SystemExit(f"error: no {n} free ports between 41000 and 60000")


def hpctrain_rate(np_: int, a, backend: str, framework: str = "torch", replicas: int = 1, threads: int = 1,
                  extra: tuple = (), row: str = "", servers: int = 0) -> float:
    """Total samples/s of `np_` processes, each with `replicas` replicas of --batch-size (mirrored: 1 process,
    n replicas). The epoch record's samples_per_s_rank is the process's own rate after 2 warm-up steps,
    counting every sample the process trains per step (hpctrain's samples_per_step = batch x micro-batches
    x local replicas): for mirrored that is all n replicas, for horovod/ddp/multiworker one rank. Times the
    number of processes it is the total in every layout. (The `train` window record's samples_per_s_total
    is summed over processes too, but it times the whole window, tracing and compilation included; its
    samples_per_s_rank is per replica, not per process.)

    The epoch figure excludes the end-of-epoch checkpoint save: since hpctrain.loop's fix the epoch rate
    is taken when its last training step ends, before the save (earlier results, before that fix, had
    the save inside the window and are lower by it). A parameter server's `servers` processes train on no data:
    the np - servers workers count."""
    trainers = np_ - servers
    samples = trainers * replicas * a.batch_size * a.steps  # one epoch = exactly --steps steps
    if a.model == "bert":
        data = ["-m", "hpctrain.bert", "--corpus", a.corpus.subset(samples), "--val-fraction", "0",
                "--preset", a.bert_preset, "--optimizer", "adamw", "--lr", str(BERT_LR)]
    else:
        data = ["-m", "hpctrain.resnet", "--dataset", "synthetic", "--arch", a.arch,
                "--image-size", str(a.image_size), "--synthetic-size", str(samples)]
    with tempfile.TemporaryDirectory() as run_dir:
        mpirun(np_, [*data[:2], "--framework", framework, "--backend", backend, *extra, *data[2:],
                     "--batch-size", str(a.batch_size), "--epochs", "1",
                     "--threads", str(threads),
                     "--workers", "0", "--eval-every-epoch", "false", "--tensorboard", "false",
                     "--progress", "never", "--log-every", str(a.steps), "--resume", "never",
                     "--warmup-epochs", "0", "--run-dir", run_dir], {"TF_CPP_MIN_LOG_LEVEL": "2"})
        rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        if not epochs:
            raise SystemExit(f"error: {data[1]} np={np_} {backend} wrote no epoch record (one epoch must be "
                             f"exactly --steps {a.steps} steps)")
        train = [r for r in rows if r["kind"] == "train"]
        if row and train:  # bytes handed to the collectives per step over the epoch; the mean peak RSS of a process
            MEASURED[row, np_] = {"peak_rss_mib": max(r["peak_rss_mib"] for r in train)}
            if all("sent_bytes" in r for r in train):
                MEASURED[row, np_]["sent_bytes_per_step"] = sum(r["sent_bytes"] for r in train) / a.steps
        # processes move in lock-step (one reduction every step): one process's rate x processes = total
        return epochs[0]["samples_per_s_rank"] * trainers


def two_or_more_rate(n: int, a, row: str) -> float:
    if n < 2:
        raise Skipped(NEEDS_TWO[row])
    return hpctrain_rate(n, a, "mpi", extra=SYNC_ARGS[row], row=row, servers=1 if "ps" in row else 0)


def tf_multiworker_rate(n: int, a) -> float:
    if n < 2:
        raise Skipped(MULTIWORKER_NP1)
    return hpctrain_rate(n, a, "multiworker", "tf", extra=("--port-base", str(free_port_base(n))))


def plain_rate(np_: int, a, env: dict, extra: tuple = ()) -> float:
    if a.model == "bert":
        model = ["--model", "bert", "--bert-preset", a.bert_preset, "--seq-len", str(a.seq_len),
                 "--vocab-size", str(a.corpus.vocab_size)]
    else:
        model = ["--arch", a.arch, "--image-size", str(a.image_size)]
    out = mpirun(np_, ["benchmarks/plain_horovod.py", *model,
                       "--batch-size", str(a.batch_size), "--steps", str(a.steps), *extra], env)
    return json.loads(out.strip().splitlines()[-1])["samples_per_s_total"]


class BuiltinCorpus:
    """hpctrain's built-in corpus, prepared once (hpctrain's own preparation, as `--corpus builtin` runs it)
    into `cache`; `subset(k)` is a corpus directory in `work` holding its first k sequences (same
    tokenizer, vocabulary and shard format, checksummed manifest), written once per k."""

    def __init__(self, cache: str, work: str, seq_len: int, need: int):
        from hpctrain.data.corpus import prepare_builtin
        from hpctrain.data.text import DataError
        try:
            self.manifest = prepare_builtin(cache, BERT_VOCAB, seq_len, log=lambda m: print(m, flush=True))
        except DataError as e:
            raise SystemExit(f"error: built-in corpus: {e}") from None
        self.cache, self.work = Path(cache), Path(work)
        self.vocab_size = int(self.manifest["vocab_size"])
        full = self.manifest["num_sequences"] - 1  # the last sequence is padded: never used
        if need > full:
            raise SystemExit(f"error: the built-in corpus in {cache} has {full} full sequences of {seq_len} "
                             f"tokens; the largest row needs {need} (processes x replicas x --batch-size x "
                             "--steps): lower --steps, --batch-size, --max-np or --seq-len")
        self.subsets: dict[int, str] = {}

    def subset(self, k: int) -> str:
        if k not in self.subsets:
            import numpy as np

            from hpctrain.data.text import TokenShards
            from hpctrain.files import sha256_file
            src = TokenShards(str(self.cache))
            rows = np.stack([src[i] for i in range(k)])
            out = self.work / f"corpus-first-{k}"
            out.mkdir(parents=True)
            np.save(out / "shard-00000.npy", rows, allow_pickle=False)
            for name in (self.manifest["tokenizer"], self.manifest["vocab"]):
                (out / name).write_bytes((self.cache / name).read_bytes())
            shard = {"file": "shard-00000.npy", "sequences": k, "sha256": sha256_file(out / "shard-00000.npy")}
            manifest = {**self.manifest, "num_sequences": k, "num_tokens": int(rows.size), "shards": [shard],
                        "subset_of": str(self.cache)}
            (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
            self.subsets[k] = str(out)
        return self.subsets[k]


def parse_engines(text: str) -> list[str]:
    names: list[str] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        known = dict.fromkeys(GROUPS["all"] + GROUPS["sync"])
        if item not in GROUPS and item not in known:
            raise SystemExit(f"error: --engines: {item!r} is neither a group ({', '.join(GROUPS)}) "
                             f"nor an engine ({', '.join(known)})")
        names += [e for e in GROUPS.get(item, (item,)) if e not in names]
    if not names:
        raise SystemExit("error: --engines is empty")
    return names


def efficiency_baseline(engine: str, base: dict) -> str | None:
    """The engine whose np=1 rate is T(1) for `engine`: its own, else (tf_multiworker) tf_horovod's, (gossip, the
    parameter server) hpctrain_mpi's."""
    if base.get(engine):
        return engine
    if engine == "tf_multiworker" and base.get("tf_horovod"):
        return "tf_horovod"
    if engine in NEEDS_TWO and base.get("hpctrain_mpi"):  # no peer or no server at np=1: plain mpi's T(1)
        return "hpctrain_mpi"
    return None


def score(rows: list[dict]) -> None:
    """Each row's efficiency against its baseline's np=1 rate (None without one: a skipped row, or no np=1 run)
    and, for torch rows, against the machine's ceiling at the same np."""
    base = {r["engine"]: r["samples_per_s_total"] for r in rows if r["np"] == 1}
    ceiling = {r["np"]: r["samples_per_s_total"] for r in rows if r["engine"] == "ceiling_no_comm"}
    for r in rows:
        ref = efficiency_baseline(r["engine"], base)
        total = r["samples_per_s_total"]
        r["efficiency_baseline"] = f"{ref} np=1" if ref else None
        r["efficiency"] = total / (r["np"] * base[ref]) if total and ref else None
        torch_row = r["engine"] in TORCH_ENGINES + SYNC_ENGINES
        r["efficiency_vs_ceiling"] = total / ceiling[r["np"]] if total and torch_row and ceiling.get(r["np"]) else None


def ratios(rows: list[dict], nps) -> dict:
    """Per np, every ratio whose two rows were measured there (a missing or skipped row drops only its ratios)."""
    by = {(r["engine"], r["np"]): r["samples_per_s_total"] for r in rows if r["samples_per_s_total"]}
    pairs = {"hpctrain_vs_plain_horovod_same_cycle": ("hpctrain_horovod", "plain_horovod_cycle10ms"),
             "hpctrain_vs_plain_horovod_default": ("hpctrain_horovod", "plain_horovod_default"),
             "hpctrain_horovod_vs_ddp": ("hpctrain_horovod", "hpctrain_ddp"),
             "hpctrain_mpi_vs_plain_horovod_same_cycle": ("hpctrain_mpi", "plain_horovod_cycle10ms"),
             "hpctrain_mpi_vs_ceiling": ("hpctrain_mpi", "ceiling_no_comm"),
             "hpctrain_horovod_vs_ceiling": ("hpctrain_horovod", "ceiling_no_comm"),
             "tf_multiworker_vs_tf_horovod": ("tf_multiworker", "tf_horovod"),
             "tf_mirrored_vs_tf_horovod": ("tf_mirrored", "tf_horovod"),
             "tf_horovod_vs_hpctrain_horovod": ("tf_horovod", "hpctrain_horovod"),
             **{f"{e}_vs_hpctrain_mpi": (e, "hpctrain_mpi") for e in SYNC_ENGINES}}
    out = {}
    for n in nps:
        r = {k: by[x, n] / by[y, n] for k, (x, y) in pairs.items() if (x, n) in by and (y, n) in by}
        if ("ceiling_no_comm", n) in by and ("ceiling_no_comm", 1) in by:
            r["ceiling_vs_linear"] = by["ceiling_no_comm", n] / (n * by["ceiling_no_comm", 1])
        out[str(n)] = r
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-np", type=int, default=2)
    p.add_argument("--min-np", type=int, default=1, help="the smallest np run (efficiency needs np=1)")
    p.add_argument("--model", choices=["resnet", "bert"], default="resnet")
    p.add_argument("--arch", default="resnet18", help="resnet: architecture")
    p.add_argument("--image-size", type=int, default=64, help="resnet: image side in pixels")
    p.add_argument("--bert-preset", choices=list(BERT_SIZES), default="tiny", help="bert: model size")
    p.add_argument("--seq-len", type=int, default=128, help="bert: tokens per sequence")
    p.add_argument("--corpus-cache", default="", help="bert: where the built-in corpus is prepared or reused "
                                                      "(default: a fresh temporary directory)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--engines", default="torch", help="comma list of groups (torch, tf, all) or engine names "
                                                      "(default: torch)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    if not 1 <= a.min_np <= a.max_np:
        raise SystemExit(f"error: --min-np {a.min_np}: allowed 1..--max-np ({a.max_np})")
    if a.steps < 4:
        raise SystemExit(f"error: --steps {a.steps}: need at least 4 (2 are warm-up)")
    engines = parse_engines(a.engines)
    with tempfile.TemporaryDirectory() as work:
        if a.model == "bert":  # prepared once, before any timing
            a.corpus = BuiltinCorpus(a.corpus_cache or str(Path(work, "corpus-builtin")), work, a.seq_len,
                                     a.max_np * a.batch_size * a.steps)
        measure(a, engines)


def measure(a, engines: list[str]) -> None:
    bert = a.model == "bert"
    unit = "sequences/s" if bert else "samples/s"
    runners = {"hpctrain_mpi": lambda n: hpctrain_rate(n, a, "mpi", row="hpctrain_mpi"),
               "hpctrain_horovod": lambda n: hpctrain_rate(n, a, "horovod", row="hpctrain_horovod"),
               "hpctrain_ddp": lambda n: hpctrain_rate(n, a, "ddp", row="hpctrain_ddp"),
               **{name: (lambda n, extra=extra, name=name: hpctrain_rate(n, a, "mpi", extra=extra, row=name))
                  for name, extra in SYNC_ARGS.items() if name not in NEEDS_TWO},
               **{name: (lambda n, name=name: two_or_more_rate(n, a, name)) for name in NEEDS_TWO},
               "plain_horovod_cycle10ms": lambda n: plain_rate(n, a, {"HOROVOD_CYCLE_TIME": "10"}),
               "plain_horovod_default": lambda n: plain_rate(n, a, {}),
               "ceiling_no_comm": lambda n: plain_rate(n, a, {"HOROVOD_CYCLE_TIME": "10"}, ("--no-comm",)),
               "tf_horovod": lambda n: hpctrain_rate(n, a, "horovod", "tf"),
               "tf_multiworker": lambda n: tf_multiworker_rate(n, a),
               # one process, n logical CPUs = n replicas sharing n intra-op threads (see the docstring)
               "tf_mirrored": lambda n: hpctrain_rate(1, a, "mirrored", "tf", replicas=n, threads=n,
                                                      extra=("--cpu-devices", str(n)))}
    threads = {"tf_mirrored": lambda n: n}  # intra-op threads of each process; 1 for all other rows
    rows = []
    for n in range(a.min_np, a.max_np + 1):
        for name in engines:
            row = {"engine": name, "np": n, "processes": 1 if name == "tf_mirrored" else n,
                   "threads_per_process": threads.get(name, lambda _: 1)(n)}
            try:
                total = runners[name](n)
            except Skipped as why:
                rows.append({**row, "samples_per_s_total": None, "samples_per_s_rank": None, "skipped": str(why)})
                print(f"{name:>24} np={n}  skipped: {why}", flush=True)
                continue
            # samples_per_s_rank: per replica (n replicas in every row, also tf_mirrored's one process)
            rows.append({**row, "samples_per_s_total": total, "samples_per_s_rank": total / n})
            print(f"{name:>24} np={n}  {total:8.1f} {unit} total  {total / n:8.1f} per replica", flush=True)
    for r in rows:
        r.update(MEASURED.get((r["engine"], r["np"]), {}))
        plain = MEASURED.get(("hpctrain_mpi", r["np"]), {}).get("sent_bytes_per_step")
        if "sent_bytes_per_step" in r and r["engine"] != "hpctrain_mpi":
            r["sent_vs_allreduce"] = r["sent_bytes_per_step"] / plain if plain else None
    score(rows)
    for r in rows:  # say so where T(1) is another engine's
        if r["efficiency"] is not None and r["efficiency_baseline"] != f"{r['engine']} np=1":
            print(f"{r['engine']:>24} np={r['np']}  efficiency {r['efficiency']:.3f} against "
                  f"{r['efficiency_baseline']}", flush=True)
    nps = range(a.min_np, a.max_np + 1)
    if bert:
        model = {"model": "bert", "preset": a.bert_preset, "seq_len": a.seq_len, "vocab_size": a.corpus.vocab_size,
                 "samples": "sequences",
                 "data": "hpctrain rows: the first processes x replicas x batch x steps sequences of hpctrain's "
                         "built-in corpus; plain rows: one fixed batch of random token ids, ~15% labelled",
                 "optimizer": f"AdamW lr {BERT_LR} per rank"}
    else:
        model = {"model": "resnet", "arch": a.arch, "image_size": a.image_size}
    save_results("scaling-bert" if bert else "scaling",
                 {**model, "batch_size": a.batch_size,
                  "steps": a.steps, "engines": engines, "threads_per_rank": 1,
                  "threads_note": "1 intra-op thread per process, except tf_mirrored: one process "
                                  "with n threads for its n replicas",
                  "rows": rows, "ratios": ratios(rows, nps)},
                 a.out, a.tag, plot=plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
        pts = [(r["np"], r["samples_per_s_total"]) for r in result["rows"]
               if r["engine"] == engine and r["samples_per_s_total"]]
        if not pts:
            continue
        style = ({"linestyle": "--", "color": "grey"} if engine == "ceiling_no_comm" else
                 {"linestyle": "-.", "marker": "s"} if engine.startswith("tf_") else {"marker": "o"})
        label = engine + (" (1 process)" if engine == "tf_mirrored" else "")
        ax.plot(*zip(*pts), label=label, **{"marker": "o", **style})
    nps = sorted({r["np"] for r in result["rows"]})
    one = {r["engine"]: r["samples_per_s_total"] for r in result["rows"] if r["np"] == 1 and r["samples_per_s_total"]}
    ref = next((e for e in ("hpctrain_horovod", "tf_horovod", *one) if e in one), None)
    if ref:
        ax.plot(nps, [one[ref] * n for n in nps], "k:", label=f"linear ({ref} np=1)")
    ax.set_xlabel("ranks (tf_mirrored: replicas in one process)")
    ax.set_xticks(nps)
    if result.get("model") == "bert":
        ax.set_ylabel("sequences/s (total)")
        ax.set_title(f"BERT-{result['preset']} MLM, seq {result['seq_len']}, batch {result['batch_size']}/replica, "
                     "built-in corpus")
    else:
        ax.set_ylabel("samples/s (total)")
        ax.set_title(f"{result['arch']} {result['image_size']}px, batch {result['batch_size']}/replica, synthetic")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
