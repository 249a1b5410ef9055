"""Typed, validated configuration: one dataclass per concern, loaded from defaults < TOML < CLI.

Each field carries its help text and, where it has a closed set of values, its choices; the CLI
flags (`--section-field` or the short alias in `metadata["flag"]`) are generated from the fields,
so a new option is one line here. Bad values raise ConfigError with one line naming the field and
what is allowed; entry points turn it into exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from hpctrain import choices as C
from hpctrain.errors import UserError
from hpctrain.oneline import OneLineParser


class ConfigError(UserError, ValueError):
    """A configuration value that is not allowed (one line, names field and allowed values)."""


def opt(default, help: str, choices=None, flag: str | None = None, minimum=None, maximum=None):
    meta = {"help": help, "choices": choices, "flag": flag, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    run_dir: str = opt("runs/default", "directory for checkpoints, metrics.jsonl and TensorBoard events")
    seed: int = opt(42, "seed for model init, data order and augmentation", minimum=0)
    epochs: int = opt(1, "epochs to train (an epoch is one pass over the training set)", minimum=1)
    max_steps: int = opt(0, "stop after this many optimizer steps in total (0 = no limit)", minimum=0)
    log_every: int = opt(10, "log rank-averaged metrics every N steps", minimum=1)
    eval_every_epoch: bool = opt(True, "evaluate top-1 on the validation set after each epoch")
    eval_every: int = opt(0, "also evaluate every N steps (0 = only at epoch ends): time-to-accuracy curves",
                          minimum=0)
    checkpoint_every: int = opt(0, "save a checkpoint every N steps (0 = only at the end of each epoch)",
                                minimum=0)
    keep_checkpoints: int = opt(3, "how many of the newest checkpoints to keep", minimum=1)
    resume: str = opt("auto", "auto = resume from the newest checkpoint of the run in run_dir if any; never (refused "
                              "where run_dir holds a run: see --new-run); or a checkpoint file path")
    new_run: bool = opt(False, "start a new run in run_dir: a run already there is moved to run_dir/archive/run-<id>/ "
                               "(never deleted; a requeue of the Slurm job that started the run resumes it instead)")
    progress: str = opt("auto", "progress bar on rank 0: auto (only on a terminal), always, never",
                        choices=list(C.PROGRESS))
    tensorboard: bool = opt(True, "write TensorBoard event files to run_dir/tb")
    deterministic: bool = opt(False, "use deterministic kernels (slower; exact resume equality)")
    hang_timeout: float = opt(300.0, "seconds without training progress before a rank writes its stacks to "
                                     "run_dir/hang-<rank>.txt and exits 86 (at least 3x the slowest step; "
                                     "start-up, checkpoint writes and profiling get 6x; 0 = off)", minimum=0.0)
    startup_timeout: float = opt(180.0, "seconds rank 0 may wait in a collective at start-up (backend init, the state "
                                        "broadcast) before the job ends with 86 naming it: a missing peer or a "
                                        "broken transport (0 = only --hang-timeout's start-up allowance)",
                                 minimum=0.0)
    preempt_check_every: int = opt(10, "every N steps the ranks agree (one allreduce) whether SIGUSR1/SIGTERM "
                                       "arrived; then all save and exit 85 for a requeue", minimum=1)


@dataclass
class DataConfig:
    dataset: str = opt("shapes", "shapes (built-in, no download), synthetic, or folder (ImageNet layout)",
                       choices=list(C.DATASETS))
    path: str = opt("", "dataset root for --dataset folder: <path>/train/<class>/*.jpg and <path>/val/...")
    image_size: int = opt(32, "training crop size in pixels", minimum=8, maximum=1024)
    num_classes: int = opt(10, "number of classes (0 = take it from the folder)", minimum=0)
    batch_size: int = opt(64, "per-rank batch size (per micro-batch when accumulating)", minimum=1)
    eval_batch_size: int = opt(0, "per-rank evaluation batch size (0 = batch_size)", minimum=0)
    workers: int = opt(2, "data-loader worker processes per rank (0 = load in the training process)",
                       minimum=0)
    synthetic_size: int = opt(1024, "samples per epoch for --dataset synthetic", minimum=1)
    verify: bool = opt(True, "check every image header at start-up and skip unreadable files")


@dataclass
class ModelConfig:
    arch: str = opt("resnet18", "network architecture",
                    choices=list(C.RESNET_ARCHS))
    zero_init_residual: bool = opt(False, "zero-init the last BN of each residual block (Goyal et al.)")


@dataclass
class OptimConfig:
    optimizer: str = opt("sgd", "optimizer", choices=list(C.OPTIMIZERS))
    lr: float = opt(0.1, "base learning rate for one rank; scaled by --lr-scaling", minimum=0.0)
    momentum: float = opt(0.9, "SGD momentum", minimum=0.0, maximum=1.0)
    weight_decay: float = opt(5e-5, "weight decay", minimum=0.0)
    lr_scaling: str = opt("linear", "linear = lr x replicas (Goyal et al., SGD), sqrt = lr x sqrt(replicas) (Adam-type "
                                    "optimizers), none = keep lr", choices=list(C.LR_SCALINGS))
    warmup_epochs: float = opt(1.0, "linear warm-up to the scaled lr over this many epochs", minimum=0.0)
    warmup_ratio: float = opt(0.0, "warm-up over this fraction of the run's steps instead of --warmup-epochs "
                                   "(BERT's recipe; 0 = use --warmup-epochs)", minimum=0.0, maximum=1.0)
    warmup_from: str = opt("base", "where the warm-up starts: base (the unscaled lr, Goyal et al.) or zero",
                           choices=list(C.WARMUP_STARTS))
    schedule: str = opt("cosine", "decay after warm-up (poly: linear decay to 0 at the last step, BERT's recipe)",
                        choices=list(C.LR_SCHEDULES), flag="--lr-schedule")
    label_smoothing: float = opt(0.0, "label smoothing for the cross-entropy loss", minimum=0.0, maximum=1.0)


@dataclass
class DistConfig:
    framework: str = opt("torch", "training framework: torch (PyTorch engine) or tf (TensorFlow/Keras 3 engine)",
                         choices=list(C.FRAMEWORKS))
    backend: str = opt("horovod", "how gradients are combined: horovod (ring-allreduce over MPI/Gloo), "
                                  "ddp (torch.distributed), mpi (--framework torch on CPU: one mpi4py Allreduce of "
                                  "the fused gradients per step), none (single process); --framework tf also: "
                                  "multiworker (tf.distribute MultiWorkerMirroredStrategy, any launcher or TF_CONFIG), "
                                  "mirrored "
                                  "(MirroredStrategy: one process, its local devices)",
                       choices=list(C.ALL_BACKENDS))
    fp16_allreduce: bool = opt(False, "compress gradients to fp16 for the allreduce (Horovod)")
    adasum: bool = opt(False, "combine gradients with Adasum instead of averaging (Horovod)")
    accumulate: int = opt(1, "backward passes per optimizer step (gradient accumulation)", minimum=1)
    amp: str = opt("none", "mixed precision: none, bf16 (CPU or GPU), fp16 (GPU, with loss scaling)",
                   choices=list(C.AMP))
    device: str = opt("auto", "auto (GPU by local rank if available, else CPU), cpu, cuda",
                      choices=list(C.DEVICES))
    hvd_cycle_time_ms: float = opt(0.0, "Horovod negotiation cycle in ms (0 = 10 on CPU, Horovod's own on GPU; "
                                        "its 1 ms default halved CPU throughput with ranks filling the cores)",
                                   minimum=0.0)
    threads: int = opt(0, "intra-op threads per rank (0 = cores on the node / ranks on the node)",
                       minimum=0)
    jit_compile: bool = opt(False, "--framework tf: compile the train and eval steps with XLA")
    collective: str = opt("auto", "--backend multiworker/mirrored: how replicas reduce: ring (gRPC, CPU), nccl "
                                  "(GPU), auto (nccl when the workers have GPUs, else ring)",
                          choices=list(C.COLLECTIVES))
    port_base: int = opt(23456, "--backend multiworker: worker k listens on port_base + k (TF_CONFIG built from the "
                                "launcher; a TF_CONFIG set by the user wins)", minimum=1024, maximum=65535)
    cpu_devices: int = opt(1, "--backend mirrored on CPU: split the CPU into this many logical devices, one replica "
                              "each (for testing; GPUs are used as they are)", minimum=1)


@dataclass
class PipelineConfig:
    stages: int = opt(1, "pipeline stages P (1 = no pipeline, pure data parallel); the ranks form P stages x "
                         "(ranks / P) data-parallel replicas", flag="--pipeline-stages", minimum=1)
    micro_batches: int = opt(4, "micro-batches (each of --batch-size) per step and replica; at least P",
                             flag="--micro-batches", minimum=1)
    schedule: str = opt("1f1b", "1f1b (one forward one backward: at most P activations held per stage) or gpipe "
                                "(all forwards, then all backwards: M held)", choices=list(C.PIPELINE_SCHEDULES),
                        flag="--pipeline-schedule")
    partition: str = opt("time", "how blocks are split into stages: time (measured forward+backward, balanced "
                                 "exactly), params (equal parameter bytes, DeepSpeed's default), uniform (equal "
                                 "block counts), or a plan .json file", flag="--partition")
    allreduce: str = opt("mpi", "how a stage's gradients are averaged over its replicas: mpi (mpi4py Allreduce on "
                                "one fused buffer) or horovod (Horovod process sets)",
                         choices=list(C.PIPELINE_ALLREDUCE),
                         flag="--pipeline-allreduce")
    stage_memory_gb: float = opt(0.0, "per-stage memory cap (GiB) the partition must respect: parameters x 4 "
                                      "(weights, grads, Adam) + held activations (0 = no cap)",
                                 flag="--stage-memory-gb", minimum=0.0)
    bandwidth_gbs: float = opt(0.0, "link bandwidth (GB/s) to charge activation transfers at each cut "
                                    "(0 = not counted)", flag="--pipeline-bandwidth-gbs", minimum=0.0)
    profile_repeats: int = opt(3, "timed repeats per block when profiling (median; after one warm-up)",
                               flag="--profile-repeats", minimum=1)


@dataclass
class SyncConfig:
    """What crosses the network and when (hpctrain.sync); the backend decides how the bytes move."""
    strategy: str = opt("allreduce", "allreduce (every gradient, every step), local-sgd (each rank steps alone, the "
                                     "model is averaged every --sync-period steps after --sync-warmup steps of "
                                     "allreduce; Lin et al.), powersgd (rank --powersgd-rank factors of each gradient "
                                     "matrix; Vogels et al.; PyTorch), gossip (each rank mixes its model with "
                                     "--gossip-graph peers each step, no global collective; PyTorch, over MPI), ps "
                                     "(a parameter server: the last --ps-servers ranks hold the weights and the "
                                     "optimizer, the others push gradients and pull weights; PyTorch, over MPI)",
                        choices=list(C.SYNC_STRATEGIES), flag="--sync")
    period: int = opt(4, "--sync local-sgd: average parameters and buffers every K steps", flag="--sync-period",
                      minimum=1)
    warmup: int = opt(0, "--sync local-sgd: steps of plain gradient allreduce before the local steps begin "
                         "(post-local SGD)", flag="--sync-warmup", minimum=0)
    powersgd_rank: int = opt(8, "--sync powersgd: rank r of the factors P (n x r) and Q (m x r) sent for each n x m "
                                "gradient matrix (lower: fewer bytes, and at some point less accuracy)",
                             minimum=1)
    powersgd_start: int = opt(10, "--sync powersgd: steps of plain allreduce before compression starts (at least 2 "
                                  "with error feedback or warm start)", minimum=0)
    powersgd_error_feedback: bool = opt(True, "--sync powersgd: add what compression left out to the next step's "
                                              "gradient (kept in checkpoints)")
    powersgd_warm_start: bool = opt(True, "--sync powersgd: start each step's power iteration from the last Q "
                                          "(kept in checkpoints)")
    gossip_graph: str = opt("exponential", "--sync gossip: exponential (one peer 2^k ranks on, k cycling; SGP) or "
                                           "ring (both neighbours every step)", choices=list(C.GOSSIP_GRAPHS))
    ps_servers: int = opt(1, "--sync ps: how many ranks (the last ones) are servers; the parameters are split over "
                             "them by bytes", minimum=1)
    ps_mode: str = opt("sync", "--sync ps: sync (each step the workers' mean gradient, as allreduce) or async (each "
                               "gradient applied on arrival; --staleness bounds how far a worker runs ahead)",
                       choices=list(C.PS_MODES))
    staleness: int = opt(2, "--sync ps --ps-mode async: a worker more than this many steps ahead of the slowest waits "
                            "for it (stale synchronous parallel; 0: in lock-step)", minimum=0)
    zero: bool = opt(False, "ZeRO stage 1: shard the optimizer state over the data-parallel ranks (PyTorch, --sync "
                            "allreduce); checkpoints stay whole-model", flag="--zero")


@dataclass
class TextDataConfig:
    corpus: str = opt("builtin", "builtin (standard-library docstrings, prepared once into --corpus-cache) or a "
                                 "directory written by `python -m hpctrain.data.text prepare`")
    corpus_cache: str = opt("runs/corpus-builtin", "where --corpus builtin is prepared (reused when present)")
    vocab_size: int = opt(8000, "WordPiece vocabulary size when preparing the builtin corpus", minimum=100)
    seq_len: int = opt(128, "tokens per sequence ([CLS] ... [SEP]) when preparing the builtin corpus",
                       minimum=8, maximum=8192)
    mask_prob: float = opt(0.15, "fraction of non-special tokens masked for MLM (80% [MASK], 10% random, "
                                 "10% unchanged)", minimum=0.0, maximum=1.0)
    batch_size: int = opt(32, "per-rank sequences per batch (per micro-batch when accumulating)", minimum=1)
    eval_batch_size: int = opt(0, "per-rank evaluation batch size (0 = batch_size)", minimum=0)
    val_fraction: float = opt(0.02, "fraction of sequences (the last ones) held out for MLM evaluation",
                              minimum=0.0, maximum=0.5)
    workers: int = opt(0, "data-loader worker processes per rank (0 = load in the training process)", minimum=0)


@dataclass
class BertModelConfig:
    preset: str = opt("tiny", "BERT size (random init): tiny 2x128, mini 4x256, base 12x768, large 24x1024",
                      choices=list(C.BERT_PRESETS))
    model_path: str = opt("", "local Hugging Face model directory to start from instead of a preset "
                              "(loaded offline; its vocab must match the corpus)")
    dropout: float = opt(0.1, "hidden and attention dropout (random-init presets)", minimum=0.0, maximum=0.9)


class _Dictable:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BertOptimConfig(OptimConfig):
    """BERT's own defaults: AdamW, a warm-up from zero over the first 10% of the steps, then linear decay, and
    the learning rate scaled by sqrt(replicas), which stays stable from 1 to 64 ranks on the built-in corpus."""
    optimizer: str = opt("adamw", "optimizer", choices=list(C.OPTIMIZERS))
    lr: float = opt(5e-4, "base learning rate for one replica; scaled by --lr-scaling", minimum=0.0)
    weight_decay: float = opt(0.01, "weight decay", minimum=0.0)
    lr_scaling: str = opt("sqrt", "linear = lr x replicas, sqrt = lr x sqrt(replicas) (Adam-type optimizers), "
                                  "none = keep lr", choices=list(C.LR_SCALINGS))
    warmup_epochs: float = opt(0.0, "warm-up over this many epochs (used when --warmup-ratio is 0)", minimum=0.0)
    warmup_ratio: float = opt(0.1, "warm-up over this fraction of the run's steps (0 = use --warmup-epochs)",
                              minimum=0.0, maximum=1.0)
    warmup_from: str = opt("zero", "where the warm-up starts: zero or base (the unscaled lr)",
                           choices=list(C.WARMUP_STARTS))
    schedule: str = opt("poly", "decay after warm-up (poly: linear decay to 0 at the last step, BERT's recipe)",
                        choices=list(C.LR_SCHEDULES), flag="--lr-schedule")


@dataclass
class BertTrainConfig(_Dictable):
    """BERT MLM pretraining (`python -m hpctrain.bert`): text data and BERT model sections."""
    run: RunConfig = field(default_factory=RunConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: BertModelConfig = field(default_factory=BertModelConfig)
    optim: BertOptimConfig = field(default_factory=BertOptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)


def sections(config_cls) -> dict:
    """{section name: dataclass} taken from the fields of a config class (TrainConfig, BertTrainConfig)."""
    return {f.name: get_type_hints(config_cls)[f.name] for f in fields(config_cls)}


@dataclass
class TrainConfig(_Dictable):
    """ResNet image classification (`python -m hpctrain.resnet`)."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)


def _flag(section: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def _coerce(value: Any, typ: type, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {value!r} is not a boolean (allowed: true, false)")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: {value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not an integer") from None
    if typ is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a number") from None
        if not math.isfinite(number):  # nan passes every < / > check below
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return number
    return str(value)


def _check(section: str, f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    where = f"{section}.{f.name} ({_flag(section, f)})"
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{where}: {value!r} is not allowed (allowed: {', '.join(m['choices'])})")
    if m.get("min") is not None and value < m["min"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {m['min']}")
    if m.get("max") is not None and value > m["max"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {m['max']}")


def set_value(cfg: TrainConfig, section: str, name: str, value: Any) -> None:
    obj = getattr(cfg, section)
    f = next(f for f in fields(obj) if f.name == name)
    typ = get_type_hints(type(obj))[name]
    coerced = _coerce(value, typ, f"{section}.{name} ({_flag(section, f)})")
    _check(section, f, coerced)
    setattr(obj, name, coerced)


def load_toml(cfg, path: str) -> set[str]:
    """Apply a TOML file; returns the "section.field" keys it set."""
    SECTIONS = sections(type(cfg))
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {path!r} does not exist or is not a file")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    keys = set()
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (allowed: {', '.join(SECTIONS)})")
        known = [f.name for f in fields(SECTIONS[section])]
        for name, value in values.items():
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                raise ConfigError(f"{path}: unknown key {section}.{name}"
                                  + (f" (did you mean {hint[0]}?)" if hint else f" (allowed: {', '.join(known)})"))
            set_value(cfg, section, name, value)
            keys.add(f"{section}.{name}")
    return keys


def build_parser(prog: str, extra=None, config_cls=None) -> argparse.ArgumentParser:
    defaults = extra or (config_cls or TrainConfig)()
    SECTIONS = sections(type(defaults))
    # A bad flag raises ConfigError (one line, printed once by the entry point, exit 2), no usage dump.
    p = OneLineParser(prog=prog, description="Train with Horovod/DDP on any launcher "
                                             "(horovodrun, mpirun, srun, single process).",
                      formatter_class=argparse.HelpFormatter, error_class=ConfigError)  # each help states its default
    p.add_argument("--config", help="TOML file with [run], [data], [model], [optim], [dist] sections")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    for section in SECTIONS:
        group = p.add_argument_group(section)
        hints = get_type_hints(SECTIONS[section])
        for f in fields(getattr(defaults, section)):
            # A bare boolean flag (--adasum) means true; --adasum false also works.
            bare = {"nargs": "?", "const": "true"} if hints[f.name] is bool else {}
            # Values stay strings here; coercion and checks happen in set_value, so CLI and TOML
            # give the same messages.
            group.add_argument(_flag(section, f), dest=f"{section}.{f.name}", default=None, **bare, metavar="V"
                               if not f.metadata.get("choices") else "{" + ",".join(f.metadata["choices"]) + "}",
                               help=f"{f.metadata['help']} (default: {getattr(getattr(defaults, section), f.name)})"
                               .replace("%", "%%"))  # argparse formats help with %
    return p


def parse(argv: list[str] | None, prog: str, config_cls=None):
    """defaults < --config TOML < CLI flags. Raises ConfigError on a bad value.
    `config_cls` (default TrainConfig) picks the sections, e.g. BertTrainConfig for hpctrain.bert."""
    cfg = (config_cls or TrainConfig)()
    args = build_parser(prog, cfg).parse_args(argv)
    explicit = set()
    if args.config:
        explicit |= load_toml(cfg, args.config)
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            set_value(cfg, section, name, value)
            explicit.add(key)
    cfg.explicit = frozenset(explicit)  # "section.field" set by the TOML or a flag (not a field: not in to_dict)
    validate(cfg)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        sys.exit(0)
    return cfg


def validate(cfg) -> None:
    """Checks that span fields."""
    d = cfg.dist
    if d.backend not in C.BACKENDS[d.framework]:
        raise ConfigError(f"dist.backend (--backend): {d.backend!r} is not a backend of the {d.framework} engine "
                          f"(allowed with --framework {d.framework}: {', '.join(C.BACKENDS[d.framework])})")
    if d.framework != "torch" and cfg.pipeline.stages > 1:
        raise ConfigError(f"pipeline.stages (--pipeline-stages): {cfg.pipeline.stages} needs --framework torch "
                          f"(allowed with --framework {d.framework}: 1)")
    if d.framework != "torch" and getattr(cfg.model, "model_path", ""):
        raise ConfigError(f"model.model_path (--model-path): a Hugging Face PyTorch model needs --framework torch "
                          f"(allowed with --framework {d.framework}: a --preset)")
    if getattr(cfg.data, "dataset", None) == "folder" and not cfg.data.path:
        raise ConfigError("data.path (--path): required with --dataset folder (a directory holding train/ and val/)")
    if cfg.dist.adasum and cfg.dist.backend != "horovod":
        raise ConfigError(f"dist.adasum (--adasum): needs --backend horovod, not {cfg.dist.backend!r}")
    if cfg.dist.fp16_allreduce and cfg.dist.backend != "horovod":
        raise ConfigError(f"dist.fp16_allreduce (--fp16-allreduce): needs --backend horovod, "
                          f"not {cfg.dist.backend!r}")
    _validate_strategy(d)
    _validate_pipeline(cfg)
    _validate_sync(cfg)
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).is_file():
        raise ConfigError(f"run.resume (--resume): {cfg.run.resume!r} is not a checkpoint file "
                          "(allowed: auto, never, or an existing file)")


def _validate_strategy(d) -> None:
    strategies = C.STRATEGY_BACKENDS
    if d.collective != "auto" and d.backend not in strategies:
        raise ConfigError(f"dist.collective (--collective): {d.collective!r} needs --backend multiworker or mirrored, "
                          f"not {d.backend!r} (allowed with {d.backend!r}: auto)")
    if d.collective == "ring" and d.backend == "mirrored":
        raise ConfigError("dist.collective (--collective): 'ring' is the cross-worker gRPC collective of --backend "
                          "multiworker (allowed with mirrored: auto, nccl)")
    if d.jit_compile and d.backend in strategies:
        raise ConfigError(f"dist.jit_compile (--jit-compile): not supported with --backend {d.backend} "
                          "(allowed there: off; XLA around strategy.run is not wired)")
    if d.cpu_devices > 1 and d.backend != "mirrored":
        raise ConfigError(f"dist.cpu_devices (--cpu-devices): {d.cpu_devices} needs --backend mirrored, "
                          f"not {d.backend!r} (allowed: 1)")


def _validate_pipeline(cfg) -> None:
    p = cfg.pipeline
    if p.partition not in C.PARTITION_METHODS and not Path(p.partition).is_file():
        raise ConfigError(f"pipeline.partition (--partition): {p.partition!r} is neither a method nor a plan file "
                          f"(allowed: {', '.join(C.PARTITION_METHODS)}, or the path of a plan .json)")
    if p.stages == 1:
        return
    if p.micro_batches < p.stages:
        raise ConfigError(f"pipeline.micro_batches (--micro-batches): {p.micro_batches} is fewer than the "
                          f"{p.stages} stages, so stages would idle (allowed: >= {p.stages})")
    d = cfg.dist
    for bad, what in ((d.accumulate > 1, f"dist.accumulate (--accumulate) {d.accumulate}: use --micro-batches"),
                      (d.amp == "fp16", "dist.amp (--amp) fp16: use bf16 (no loss scaling across stages)"),
                      (d.adasum, "dist.adasum (--adasum)"),
                      (d.fp16_allreduce, "dist.fp16_allreduce (--fp16-allreduce)")):
        if bad:
            raise ConfigError(f"{what} is not supported with --pipeline-stages {p.stages}")


def _validate_sync(cfg) -> None:
    """The synchronization choices against the engine, the backend and the gradient options: one line naming what is
    allowed instead."""
    s, d = cfg.sync, cfg.dist
    chosen = f"--sync {s.strategy}" + (" --zero" if s.zero else "")
    if s.zero and s.strategy != "allreduce":
        raise ConfigError(f"sync.zero (--zero): shards the optimizer state of an allreduce step, not with --sync "
                          f"{s.strategy} (allowed with --zero: --sync allreduce)")
    if s.strategy == "allreduce" and not s.zero:
        return
    if d.framework == "tf" and (s.strategy != "local-sgd" or s.zero):
        raise ConfigError(f"sync ({chosen}): PyTorch-only (allowed with --framework tf: --sync "
                          f"{', '.join(C.SYNC_TF)}; local-sgd on --backend horovod)")
    if d.framework == "tf" and d.backend != "horovod":
        raise ConfigError(f"sync.strategy (--sync): 'local-sgd' with --framework tf needs --backend horovod, not "
                          f"{d.backend!r} (allowed with {d.backend!r}: allreduce)")
    if d.backend == "none":
        raise ConfigError(f"sync ({chosen}): needs several ranks on a data-parallel backend (allowed: --backend "
                          f"{', '.join(b for b in C.BACKENDS[d.framework] if b != 'none')}; with --backend none: "
                          f"--sync allreduce, no --zero)")
    if cfg.pipeline.stages > 1:
        raise ConfigError(f"sync ({chosen}): not supported with --pipeline-stages {cfg.pipeline.stages} (allowed "
                          f"there: --sync allreduce, no --zero)")
    for on, what in ((d.adasum, "dist.adasum (--adasum)"),
                     (d.fp16_allreduce, "dist.fp16_allreduce (--fp16-allreduce)")):
        if on:
            raise ConfigError(f"{what}: combines every gradient each step, not with {chosen} (allowed with it: --sync "
                              f"allreduce, no --zero)")
    if s.strategy == "ps" and d.amp == "fp16":
        raise ConfigError("dist.amp (--amp): 'fp16' loss scaling is not supported with --sync ps (allowed there: "
                          "none, bf16)")
    if s.strategy == "powersgd" and s.powersgd_start < 2 and (s.powersgd_error_feedback or s.powersgd_warm_start):
        raise ConfigError(f"sync.powersgd_start (--powersgd-start): {s.powersgd_start} with error feedback or warm "
                          f"start (allowed: 2 or more, or --powersgd-error-feedback false --powersgd-warm-start false)")
