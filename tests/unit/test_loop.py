"""hpctrain.loop drives any engine of its protocol: here a NumPy one (linear regression, one process),
so the loop's own rules are checked without torch: epochs and the mid-epoch resume offset, one
reduction per log interval, checkpoint cadence, the agreed stop, evaluation at each epoch's end."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from hpctrain import loop
from hpctrain.config import RunConfig
from hpctrain.errors import NonFiniteError


class NumpyEngine:
    def __init__(self, n=16, batch=4, micro=1, epochs=2, validation=True, lr=0.2):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, 3))
        self.y = self.x @ np.array([1.0, -2.0, 0.5])
        self.w = np.zeros(3)
        self.batch, self.micro_batches = batch, micro
        self.step, self.steps_per_epoch = 0, n // (batch * micro)
        self.total_steps = self.steps_per_epoch * epochs
        self.samples_per_step, self.counts_samples, self.data_size, self.local_replicas = batch * micro, True, 1, 1
        self.has_validation, self.logger, self.base_lr = validation, None, lr
        self.calls = {"reduce": 0, "save": [], "eval": [], "epochs": [], "agree": 0, "progress": []}

    def progress(self, step):
        self.calls["progress"].append(step)

    def epoch_batches(self, epoch, skip_batches):
        self.calls["epochs"].append((epoch, skip_batches))
        order = np.random.default_rng(epoch).permutation(len(self.x))
        for i in range(skip_batches, len(order) // self.batch):
            yield order[i * self.batch:(i + 1) * self.batch]

    def train_step(self, micro_batches):
        stats = np.zeros(3)
        grad = np.zeros(3)
        for idx in micro_batches:
            err = self.x[idx] @ self.w - self.y[idx]
            grad += self.x[idx].T @ err / len(idx) / len(micro_batches)
            stats += [float((err ** 2).mean()) * len(idx), 0.0, len(idx)]
        self.w -= self.lr(self.step) * grad
        self.step += 1
        return stats

    def reduce_sum(self, stats, extra):
        self.calls["reduce"] += 1
        return [*map(float, stats), *extra]

    def agree(self, flag):
        self.calls["agree"] += 1
        return float(flag)

    def lr(self, step):
        return self.base_lr

    def save(self):
        self.calls["save"].append(self.step)

    def evaluate(self):
        self.calls["eval"].append(self.step)
        return {"val_loss": float(((self.x @ self.w - self.y) ** 2).mean())}

    def log(self, message):
        self.calls.setdefault("messages", []).append(message)


def run_cfg(tmp_path, **kw):
    return RunConfig(run_dir=str(tmp_path), progress="never", tensorboard=False, **kw)


class StopAt:
    """A preemption stand-in whose flag is raised once the engine reaches `step`."""
    reason = "SIGUSR1"

    def __init__(self, engine, step):
        self.engine, self.at = engine, step

    @property
    def requested(self):
        return self.engine.step >= self.at

    def should_stop(self, step, every, agree):
        return step % every == 0 and agree(self.engine.step >= self.at) > 0


def test_trains_to_the_end_with_one_reduction_per_log_interval(tmp_path):
    e = NumpyEngine()
    result = loop.train(e, run_cfg(tmp_path, epochs=2, log_every=4), rank=0)
    assert e.step == e.total_steps == 8
    assert e.calls["reduce"] == 2  # steps 4 and 8: one collective each, none on the other steps
    assert e.calls["save"] == [4, 8] and e.calls["eval"] == [4, 8]  # each epoch's end
    assert e.calls["epochs"] == [(0, 0), (1, 0)]
    assert result["val_loss"] < 0.5 * float((e.y ** 2).mean())  # it learned
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8]
    assert [r["kind"] for r in records].count("epoch") == 2
    # the process's peak RSS rides on the same reduction: this test process holds far more than 10 MiB
    assert all(10 < r["rss_mib"] <= r["peak_rss_mib"] < 1e6 for r in records if r["kind"] == "train")


def test_resumes_mid_epoch_at_the_offset_and_skips_the_seen_batches(tmp_path):
    e = NumpyEngine(n=64, micro=2)  # 64 samples, 4 x 2 per step: 8 steps per epoch
    e.step = 11  # as restored from a checkpoint: epoch 1, 3 steps in
    loop.train(e, run_cfg(tmp_path, epochs=2, log_every=5), rank=0)
    assert e.calls["epochs"] == [(1, 3 * 2)]  # 3 steps x 2 micro-batches skipped, not replayed
    assert e.step == 16 and e.calls["save"] == [16]


def test_checkpoint_cadence_and_max_steps(tmp_path):
    e = NumpyEngine(epochs=3)
    loop.train(e, run_cfg(tmp_path, epochs=3, max_steps=7, checkpoint_every=3, log_every=100), rank=0)
    assert e.step == 7
    assert e.calls["save"] == [3, 4, 6, 7]  # every 3 steps, the epoch's end (4), and the stop at max_steps
    assert e.calls["reduce"] == 1  # only the final step logs


def test_eval_every_steps_besides_the_epochs_end(tmp_path):
    e = NumpyEngine(epochs=3)  # 4 steps per epoch
    loop.train(e, run_cfg(tmp_path, epochs=3, eval_every=3, log_every=100), rank=0)
    assert e.calls["eval"] == [3, 4, 6, 8, 9, 12]  # every 3 steps and each epoch's end, once at step 12
    e = NumpyEngine(epochs=2)
    loop.train(e, run_cfg(tmp_path / "b", epochs=2, eval_every=2, eval_every_epoch=False, log_every=100), rank=0)
    assert e.calls["eval"] == [2, 4, 6, 8]


def test_agreed_stop_saves_and_reports_the_signal(tmp_path):
    e = NumpyEngine(epochs=3)
    result = loop.train(e, run_cfg(tmp_path, epochs=3, preempt_check_every=2, log_every=1), rank=0,
                        preemption=StopAt(e, 5))
    assert result["stopped_by_signal"] == "SIGUSR1"
    assert e.step == 6 and e.calls["save"][-1] == 6  # first check at or after step 5
    assert e.calls["eval"] == [4]  # no evaluation for the stop mid-epoch
    assert any("stopping at step 6" in m for m in e.calls["messages"])


def test_non_finite_loss_stops_before_a_save(tmp_path):
    e = NumpyEngine(lr=float("nan"))
    with pytest.raises(NonFiniteError, match="rank-averaged loss"):
        loop.train(e, run_cfg(tmp_path, epochs=2, log_every=2), rank=0)
    assert e.calls["save"] == []


def test_loop_imports_no_framework():
    code = "import sys, hpctrain.loop; assert not {'torch', 'tensorflow'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_epoch_rate_counts_training_steps_not_the_end_of_epoch_save(tmp_path):
    # A slow save (a large checkpoint, a slow file system) must not show up as slow training: the epoch's
    # samples/s is taken before its closing save. Each step takes >= 10 ms, the save 1 s.
    import time

    class Slow(NumpyEngine):
        def train_step(self, micro_batches):
            time.sleep(0.01)
            return super().train_step(micro_batches)

        def save(self):
            time.sleep(1.0)
            super().save()

    e = Slow(n=64, batch=4, epochs=1)  # 16 steps, 14 timed (2 warm-up): ~0.14 s of training
    loop.train(e, run_cfg(tmp_path, epochs=1, log_every=4), 0)
    rate = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "epoch"][0]["samples_per_s_rank"]
    assert rate > 4 * 14 / 0.9, rate  # with the save inside the window it would be below 4 x 14 / 1.14 = 49


def test_optimizer_state_rides_on_the_reduction_beside_the_busy_times(tmp_path):
    # rank 1 of 2 (the reduction adds rank 0's figures: a second busy time, and an optimizer state twice as large)
    class Ranked(NumpyEngine):
        cluster = type("Cluster", (), {"size": 2, "rank": 1})()

        def wait_seconds(self):
            return 0.0

        def rank_nodes(self):
            return ["a", "b"]

        def optimizer_state_bytes(self):
            return 3 * 2**20

        def reduce_sum(self, stats, extra):
            self.calls["reduce"] += 1
            *head, busy0, busy1, state0, state1, link0, link1 = extra  # the link slots: NaN on one host
            assert math.isnan(link1) and link0 == 0.0
            return [*map(float, stats), *head, busy1, busy1, 2 * state1, state1, link1, link1]

    e = Ranked()
    loop.train(e, run_cfg(tmp_path, log_every=2), rank=0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["optimizer_state_mib_max"] for r in train] == [6.0] * 4  # 8 steps, a record every 2
    assert all(r["busy_s_per_step_max"] == r["busy_s_per_step_median"] >= 0 for r in train), train
    assert not any("link_mbit_s_min" in r for r in train)  # no link read: no link figures
