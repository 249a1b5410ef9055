"""Pipeline schedules as plain op lists (pure: no torch, no MPI), one list per stage.

An op is ("F", i) or ("B", i): forward or backward of micro-batch i. Backward runs in micro-batch
order on every stage, so gradients accumulate in the same order as single-process accumulation.

- GPipe (Huang et al. 2019): all M forwards, then all M backwards; a stage holds M activations.
- 1F1B (PipeDream-flush, Narayanan et al. 2021): stage s runs P - s - 1 warm-up forwards, then
  alternates one forward and one backward, then drains; it never holds more than P - s activations.
"""
from __future__ import annotations

SCHEDULES = ("1f1b", "gpipe")


def gpipe(stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    return [("F", i) for i in range(micro_batches)] + [("B", i) for i in range(micro_batches)]


def one_f_one_b(stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    warmup = min(stages - stage - 1, micro_batches)
    ops = [("F", i) for i in range(warmup)]
    for i in range(micro_batches - warmup):  # steady state: F(warmup + i) then B(i)
        ops += [("F", warmup + i), ("B", i)]
    ops += [("B", i) for i in range(micro_batches - warmup, micro_batches)]  # cool-down
    return ops


def ops_for(schedule: str, stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not allowed (allowed: {', '.join(SCHEDULES)})")
    return (gpipe if schedule == "gpipe" else one_f_one_b)(stages, micro_batches, stage)


def peak_in_flight(ops: list[tuple[str, int]]) -> int:
    """Most micro-batches whose activations are held (forward done, backward not yet) at any time."""
    held = peak = 0
    for kind, _ in ops:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak


def activation_slots(schedule: str, stages: int, micro_batches: int) -> list[int]:
    """Per-stage activation slots for the partitioner's memory model."""
    return [peak_in_flight(ops_for(schedule, stages, micro_batches, s)) for s in range(stages)]


def simulate(schedule: str, stages: int, micro_batches: int, fwd: list[float], bwd: list[float]) -> float:
    """Makespan of one step when stage s takes fwd[s] / bwd[s] per micro-batch and transfers are free:
    an op starts when its stage is free and its input (the neighbour's F or B of the same
    micro-batch) is done. Used by the benchmark for the ideal a schedule can reach."""
    ops = [ops_for(schedule, stages, micro_batches, s) for s in range(stages)]
    done: dict[tuple[str, int, int], float] = {}
    pos, clock = [0] * stages, [0.0] * stages
    while any(pos[s] < len(ops[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(ops[s]):
                continue
            kind, i = ops[s][pos[s]]
            dep = ("F", s - 1, i) if kind == "F" and s > 0 else ("B", s + 1, i) if kind == "B" and s < stages - 1 \
                else ("F", s, i) if kind == "B" else None
            if dep is not None and dep not in done:
                continue
            start = max(clock[s], done.get(dep, 0.0))
            clock[s] = done[(kind, s, i)] = start + (fwd[s] if kind == "F" else bwd[s])
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule} deadlocks for P={stages}, M={micro_batches}")
    return max(clock)
