"""What a model family brings to the engines: its data, its model and task per framework, and what
to do after training. Framework-neutral: the per-framework parts import their framework lazily."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hpctrain.config import TrainConfig


@dataclass
class World:
    """What a recipe may know about the job while it opens its data."""
    rank: int
    data_rank: int
    data_size: int
    broadcast_object: Callable  # rank 0's value to every rank (the engine backend's collective)
    log: Callable[[str], None]


@dataclass
class Data:
    train: object               # (index, epoch) -> sample sources; len() = samples
    val: object | None
    contiguous: bool = False    # each rank reads a contiguous index range (memory-mapped shards)
    info: dict = field(default_factory=dict)  # recipe-specific (BERT: the token shards)


class Recipe:
    """Subclasses set `name` (`python -m hpctrain.<name>`) and `config_cls`, and implement `data` and,
    per framework F they support, `F_model(cfg, data)` and `F_task(cfg)`; `F_after(trainer, cfg)` is
    optional (runs on every rank once training ended without a stop signal)."""
    name = ""
    config_cls = TrainConfig

    @property
    def prog(self) -> str:
        return f"hpctrain.{self.name}"

    def data(self, cfg, world: World) -> Data:
        raise NotImplementedError

    def describe(self, cfg, data: Data, params: int) -> str:
        """The model part of the start-up line, e.g. 'resnet18'."""
        raise NotImplementedError

    def signature(self, cfg, data: Data | None = None) -> dict:
        """What makes two runs the same model (hpctrain.rundir): from the config alone when `data` is None,
        else also what the data decides (classes of a folder, a corpus' vocabulary)."""
        raise NotImplementedError

    def identity(self, cfg, data: Data | None = None) -> dict:
        return {"framework": cfg.dist.framework, "recipe": self.name, **self.signature(cfg, data)}
