"""Split a chain of L blocks into P contiguous pipeline stages: the maths only (stdlib, no torch / mpi4py / horovod).

Cost model, per micro-batch, for stage s holding blocks [start, end):

* time   = sum of the blocks' forward+backward time
           + 2 * act_bytes / bandwidth for each cut beside the stage (the activation goes forward, its gradient comes
           back). Point-to-point transfers are not overlapped with compute, so sender and receiver are both busy:
           a cut is charged to BOTH stages beside it.
* memory = state_factor * parameter bytes (4 = weights + grads + two Adam moments)
           + slots[s] * activation bytes the stage keeps for backward (one copy per micro-batch in flight on that
           stage: GPipe keeps M, 1F1B keeps min(M, P - s)).

In steady state a pipeline runs at the pace of its slowest stage, so method "time" minimises the largest stage time
exactly (dynamic programming, O(P * L^2)) subject to every stage fitting under a memory cap. "params" (DeepSpeed's
default: balance parameter bytes) and "uniform" (equal block counts) are scored with the same model, so the three
plans can be compared side by side.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpctrain.choices import PARTITION_METHODS
from hpctrain.errors import UserError
from hpctrain.files import atomic_write

_GIB = float(1 << 30)
# Float stage times that differ only by summation rounding count as equal, so the documented tie-break (earliest
# cuts) picks the plan rather than the last ulp. Integer weights (bytes) are compared exactly.
_REL_EPS = 1e-12
_PLAN_KEYS = ("method", "stages", "costs", "stage_times", "stage_memory", "bottleneck", "lower_bound")


@dataclass(frozen=True)
class LayerCost:
    name: str
    time_s: float  # forward + backward time of this block for one micro-batch (median of measurements)
    param_bytes: int  # bytes of this block's parameters
    act_bytes: int  # bytes of this block's output for one micro-batch (what crosses a cut placed after it)
    saved_bytes: int = 0  # activation bytes kept for backward per micro-batch in flight (0: use act_bytes)


class PartitionError(UserError, ValueError):
    """Bad partition request or plan file; the message is one line naming the bad value and what is allowed."""


# ---------------------------------------------------------------------------------------------------- cost model


def _kept(c: LayerCost) -> int:
    # Without a measurement, assume the block keeps (about) its own output for backward.
    return c.saved_bytes or c.act_bytes


def _memory(param_sum: int, kept_sum: int, slots: int, state_factor: float) -> int:
    # One expression shared by stage_memory() and the DP so both give bit-identical numbers.
    return int(state_factor * param_sum + slots * kept_sum)


def _transfer(costs: Sequence[LayerCost], start: int, end: int, bandwidth: float | None) -> float:
    if bandwidth is None:
        return 0.0
    t = 0.0
    if start > 0:  # incoming cut: the previous stage's last output arrives, its gradient goes back
        t += 2.0 * costs[start - 1].act_bytes / bandwidth
    if end < len(costs):  # outgoing cut: our last block's output leaves, its gradient comes back
        t += 2.0 * costs[end - 1].act_bytes / bandwidth
    return t


def _check_range(costs: Sequence[LayerCost], start: int, end: int) -> None:
    if not 0 <= start < end <= len(costs):
        raise PartitionError(f"stage blocks [{start}, {end}): need 0 <= start < end <= {len(costs)}")


def stage_time(costs: Sequence[LayerCost], start: int, end: int, bandwidth: float | None = None) -> float:
    """Predicted seconds per micro-batch of a stage holding blocks [start, end): compute + transfers at its cuts."""
    _check_range(costs, start, end)
    compute = 0.0
    for c in costs[start:end]:  # left-to-right accumulation, the same order the DP table uses
        compute += c.time_s
    return compute + _transfer(costs, start, end, bandwidth)


def stage_memory(costs: Sequence[LayerCost], start: int, end: int, slots: int = 1, state_factor: float = 4.0) -> int:
    """Predicted bytes of a stage holding blocks [start, end) with `slots` micro-batches' activations kept."""
    _check_range(costs, start, end)
    return _memory(sum(c.param_bytes for c in costs[start:end]), sum(_kept(c) for c in costs[start:end]),
                   slots, state_factor)


# ---------------------------------------------------------------------------------------------------- plan


def _gib(n: float) -> str:
    exact = int(n) if float(n).is_integer() else n
    return f"{n / _GIB:.4g} GiB ({exact} bytes)"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_costs(costs: Sequence[LayerCost]) -> list[LayerCost]:
    costs = list(costs)
    if not costs:
        raise PartitionError("no blocks to partition: need at least 1 LayerCost")
    for i, c in enumerate(costs):
        if not isinstance(c, LayerCost):
            raise PartitionError(f"block {i} is a {type(c).__name__}: need a LayerCost")
        if not isinstance(c.name, str):
            raise PartitionError(f"block {i} name = {c.name!r}: must be a string")
        if not (_is_num(c.time_s) and math.isfinite(c.time_s) and c.time_s >= 0):
            raise PartitionError(f"block {i} ({c.name!r}) time_s = {c.time_s!r}: must be a finite number >= 0")
        for key in ("param_bytes", "act_bytes", "saved_bytes"):
            v = getattr(c, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise PartitionError(f"block {i} ({c.name!r}) {key} = {v!r}: must be an integer >= 0")
    return costs


def _check_bounds(raw: Any, n_blocks: int) -> list[tuple[int, int]]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise PartitionError(f"stages = {raw!r}: need a non-empty list of [start, end) pairs")
    bounds: list[tuple[int, int]] = []
    prev_end = 0
    for s, pair in enumerate(raw):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise PartitionError(f"stages[{s}] = {pair!r}: need a [start, end) pair of integers")
        start, end = pair
        if start != prev_end:
            raise PartitionError(f"stages[{s}] = {list(pair)} starts at {start}, expected {prev_end}: "
                                 "stages must be contiguous from block 0")
        if end <= start:
            raise PartitionError(f"stages[{s}] = {list(pair)} is empty: every stage needs at least 1 block")
        bounds.append((start, end))
        prev_end = end
    if prev_end != n_blocks:
        raise PartitionError(f"stages end at block {prev_end} but there are {n_blocks} blocks: stages must cover all")
    return bounds


@dataclass
class Plan:
    method: str  # "time" | "params" | "uniform"
    stages: list[tuple[int, int]]  # [start, end) block ranges, contiguous, cover 0..L, none empty
    costs: list[LayerCost]
    stage_times: list[float]  # predicted seconds per micro-batch per stage (compute + transfer)
    stage_memory: list[int]  # predicted bytes per stage
    bottleneck: float  # max(stage_times)
    lower_bound: float  # max(sum(time_s)/P, max(time_s)): no contiguous split beats it (compute only)
    bandwidth: float | None = None  # bytes/s used for transfer cost, None = not counted
    source: str = field(default="", compare=False, repr=False)  # file it was loaded from, for error messages

    @property
    def balance(self) -> float:
        """bottleneck / lower_bound: 1.0 is perfect (may read 1 - 1e-16 from rounding); inf if only transfers cost."""
        if self.lower_bound > 0:
            return self.bottleneck / self.lower_bound
        return 1.0 if self.bottleneck == 0 else math.inf

    @property
    def layer_names(self) -> list[str]:
        return [c.name for c in self.costs]

    def stage_layers(self, s: int) -> list[str]:
        start, end = self.stages[s]
        return [c.name for c in self.costs[start:end]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "stages": [[a, b] for a, b in self.stages],
            "costs": [asdict(c) for c in self.costs],
            "stage_times": list(self.stage_times),
            "stage_memory": list(self.stage_memory),
            "bottleneck": self.bottleneck,
            "lower_bound": self.lower_bound,
            "bandwidth": self.bandwidth,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        if not isinstance(d, dict):
            raise PartitionError(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in _PLAN_KEYS if k not in d]
        if missing:
            raise PartitionError(f"missing key(s) {', '.join(missing)}: a plan needs {', '.join(_PLAN_KEYS)}")
        if d["method"] not in PARTITION_METHODS:
            raise PartitionError(f"method = {d['method']!r}: allowed {', '.join(PARTITION_METHODS)}")
        if not isinstance(d["costs"], list):
            raise PartitionError(f"costs = {d['costs']!r}: need a list of block costs")
        costs = []
        for i, c in enumerate(d["costs"]):
            try:
                costs.append(LayerCost(**c))
            except TypeError:
                need = "name, time_s, param_bytes, act_bytes[, saved_bytes]"
                raise PartitionError(f"costs[{i}] = {c!r}: need {need}") from None
        costs = _check_costs(costs)
        bounds = _check_bounds(d["stages"], len(costs))
        times, mems = d["stage_times"], d["stage_memory"]
        if not (isinstance(times, list) and len(times) == len(bounds) and all(_is_num(t) for t in times)):
            raise PartitionError(f"stage_times = {times!r}: need {len(bounds)} numbers, one per stage")
        if not (isinstance(mems, list) and len(mems) == len(bounds) and all(isinstance(m, int) for m in mems)):
            raise PartitionError(f"stage_memory = {mems!r}: need {len(bounds)} integers, one per stage")
        for key in ("bottleneck", "lower_bound"):
            if not (_is_num(d[key]) and math.isfinite(d[key])):
                raise PartitionError(f"{key} = {d[key]!r}: must be a finite number")
        bw = d.get("bandwidth")
        if bw is not None and not (_is_num(bw) and bw > 0):
            raise PartitionError(f"bandwidth = {bw!r}: must be a number > 0 or null")
        return cls(d["method"], bounds, costs, list(times), list(mems), d["bottleneck"], d["lower_bound"], bw)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(self.to_dict(), indent=1) + "\n").encode()
        atomic_write(path, lambda f: f.write(data))  # a crash leaves the old plan or the new one, never half

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PartitionError(f"pipeline plan {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PartitionError(f"pipeline plan {path}: cannot read ({e})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PartitionError(f"pipeline plan {path}: not valid JSON ({e})") from None
        try:
            plan = cls.from_dict(d)
        except PartitionError as e:
            raise PartitionError(f"pipeline plan {path}: {e}") from None
        plan.source = str(path)
        return plan

    def check_matches(self, layer_names: Sequence[str], stages: int) -> None:
        """Refuse to run a plan made for another model (block list) or another pipeline depth."""
        who = f"plan {self.source}" if self.source else f"plan (method {self.method!r})"
        names = list(layer_names)
        if len(names) != len(self.costs):
            raise PartitionError(f"{who} was made for {len(self.costs)} blocks, the model has {len(names)}")
        for i, (mine, theirs) in enumerate(zip(self.layer_names, names)):
            if mine != theirs:
                raise PartitionError(f"{who} was made for other blocks: block {i} is {mine!r} in the plan, "
                                     f"{theirs!r} in the model")
        if stages != len(self.stages):
            raise PartitionError(f"{who} has {len(self.stages)} stages, the run asks for {stages}")


# ---------------------------------------------------------------------------------------------------- solver


def _min_max_split(n_blocks: int, n_stages: int, weight: Callable[[int, int, int], float],
                   allowed: Callable[[int, int, int], bool], rel_eps: float) -> list[tuple[int, int]] | None:
    """The contiguous split minimising max over stages of weight(s, start, end), using only allowed stages.

    best[s][a] = optimum for stages s..P-1 covering blocks a..L-1. The suffix form lets the reconstruction walk
    forward from block 0 and take, stage by stage, the EARLIEST cut that still reaches the optimum: among equal
    optima (within rel_eps) the plan whose cut list is lexicographically smallest wins. None if nothing is allowed.
    """
    L, P = n_blocks, n_stages
    best: list[list[float]] = [[math.inf] * (L + 1) for _ in range(P + 1)]
    best[P][L] = 0

    def ends(s: int, a: int) -> range:  # stage s from block a must leave one block for each later stage
        return range(a + 1, L - (P - 1 - s) + 1)

    for s in range(P - 1, -1, -1):
        for a in range(s, L - (P - 1 - s)):
            v = math.inf
            for b in ends(s, a):
                rest = best[s + 1][b]
                if rest < v and allowed(s, a, b):
                    v = min(v, max(weight(s, a, b), rest))
            best[s][a] = v
    opt = best[0][0]
    if opt == math.inf:
        return None
    limit = opt + rel_eps * abs(opt)
    bounds, a = [], 0
    for s in range(P):
        # best[s][a] <= limit holds here, so some end qualifies (the one that achieved it).
        b = next(b for b in ends(s, a) if best[s + 1][b] <= limit and allowed(s, a, b) and weight(s, a, b) <= limit)
        bounds.append((a, b))
        a = b
    return bounds


def _check_args(L: int, stages, method: str, memory_cap, bandwidth, state_factor, slots) -> list[int]:
    """partition()'s arguments checked, one error each; returns the activation slots per stage."""
    if not isinstance(stages, int) or isinstance(stages, bool):
        raise PartitionError(f"pipeline stages = {stages!r}: must be an integer in 1..{L}")
    if stages < 1:
        raise PartitionError(f"pipeline stages = {stages}: allowed 1..{L}")
    if stages > L:
        raise PartitionError(f"more pipeline stages ({stages}) than blocks ({L}): allowed 1..{L}")
    if method not in PARTITION_METHODS:
        raise PartitionError(f"unknown partition method {method!r}: allowed {', '.join(PARTITION_METHODS)}")
    if memory_cap is not None and not (_is_num(memory_cap) and memory_cap > 0):
        raise PartitionError(f"memory_cap = {memory_cap!r}: must be a number of bytes > 0 (or None for no cap)")
    if bandwidth is not None and not (_is_num(bandwidth) and bandwidth > 0):
        raise PartitionError(f"bandwidth = {bandwidth!r}: must be bytes/s > 0 (or None to ignore transfers)")
    if not (_is_num(state_factor) and math.isfinite(state_factor) and state_factor >= 0):
        raise PartitionError(f"state_factor = {state_factor!r}: must be a finite number >= 0")
    slots = [1] * stages if slots is None else list(slots)
    if len(slots) != stages:
        raise PartitionError(f"slots has {len(slots)} entries for {stages} stages: need one per stage")
    for s, k in enumerate(slots):
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise PartitionError(f"slots[{s}] = {k!r}: must be an integer >= 1")
    return slots


def _uniform_bounds(L: int, P: int) -> list[tuple[int, int]]:
    """Equal block counts; the first L % P stages get one more."""
    q, r = divmod(L, P)
    bounds, a = [], 0
    for s in range(P):
        b = a + q + (1 if s < r else 0)
        bounds.append((a, b))
        a = b
    return bounds


def partition(costs: Sequence[LayerCost], stages: int, method: str = "time", memory_cap: float | None = None,
              bandwidth: float | None = None, slots: Sequence[int] | None = None, state_factor: float = 4.0) -> Plan:
    """Split `costs` (one per block, in order) into `stages` contiguous stages.

    method "time": exact minimum of the slowest stage's stage_time under memory_cap; "params": exact minimum of the
    largest per-stage parameter bytes under memory_cap; "uniform": equal block counts, the first L % P stages get one
    more. slots[s] = micro-batches whose activations stage s holds (GPipe: M everywhere, 1F1B: min(M, P - s));
    default 1. Ties: earliest cuts first (see _min_max_split).
    """
    costs = _check_costs(costs)
    L, P = len(costs), stages
    slots = _check_args(L, stages, method, memory_cap, bandwidth, state_factor, slots)

    # Prefix sums of integers are exact, so mem() below equals stage_memory() bit for bit.
    params, kept = [0], [0]
    for c in costs:
        params.append(params[-1] + c.param_bytes)
        kept.append(kept[-1] + _kept(c))

    def mem(s: int, a: int, b: int) -> int:
        return _memory(params[b] - params[a], kept[b] - kept[a], slots[s], state_factor)

    def fits(s: int, a: int, b: int) -> bool:
        return memory_cap is None or mem(s, a, b) <= memory_cap

    if method == "uniform":
        bounds = _uniform_bounds(L, P)
        for s, (a, b) in enumerate(bounds):
            if not fits(s, a, b):
                raise PartitionError(f"uniform split: stage {s} (blocks {a}..{b - 1}) needs {_gib(mem(s, a, b))}, "
                                     f"above memory_cap {_gib(memory_cap)}: use method 'time' or raise the cap")
    else:
        if method == "time":
            # table[a][b] = stage time of [a, b), accumulated in the same order as stage_time() (bit-identical).
            table: list[list[float]] = [[0.0] * (L + 1) for _ in range(L)]
            for a in range(L):
                acc = 0.0
                for b in range(a + 1, L + 1):
                    acc += costs[b - 1].time_s
                    table[a][b] = acc + _transfer(costs, a, b, bandwidth)
            found = _min_max_split(L, P, lambda s, a, b: table[a][b], fits, _REL_EPS)
        else:
            found = _min_max_split(L, P, lambda s, a, b: params[b] - params[a], fits, 0.0)
        if found is None:
            # Report the smallest cap that would work: min over splits of the largest stage memory (same DP).
            smallest = _min_max_split(L, P, mem, lambda s, a, b: True, 0.0)
            assert smallest is not None
            need = max(mem(s, a, b) for s, (a, b) in enumerate(smallest))
            raise PartitionError(f"memory_cap {_gib(memory_cap)} fits no split into {P} stages: "
                                 f"the smallest cap that fits is {_gib(need)}")
        bounds = found

    # Every method is scored with the same public model, so plans are comparable.
    times = [stage_time(costs, a, b, bandwidth) for a, b in bounds]
    mems = [stage_memory(costs, a, b, slots[s], state_factor) for s, (a, b) in enumerate(bounds)]
    lower = max(math.fsum(c.time_s for c in costs) / P, max(c.time_s for c in costs))
    return Plan(method, bounds, costs, times, mems, max(times), lower, bandwidth)
