import json
import subprocess
import sys

import pytest

from hpctrain.lr_schedule import lr_at, scaled_lr
from hpctrain.metrics import MetricsLogger


def test_linear_scaling_and_warmup():
    peak = scaled_lr(0.1, 8, "linear")
    assert peak == pytest.approx(0.8) and scaled_lr(0.1, 8, "none") == 0.1
    kw = dict(base_lr=0.1, peak_lr=peak, warmup_steps=10, total_steps=110)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(5, schedule="cosine", **kw) == pytest.approx(0.45)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.8)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.4)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(90, schedule="step", **kw) == pytest.approx(0.008)
    assert lr_at(90, schedule="constant", **kw) == pytest.approx(0.8)


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    m = MetricsLogger(tmp_path, enabled=True, total_steps=2, progress="never")
    m.log(1, "train", {"loss": 2.5, "epoch": 0})
    m.log(2, "train", {"loss": 2.0, "epoch": 0})
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0)]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    from tensorboard.util.tensor_util import make_ndarray
    assert [float(make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")] == [2.5, 2.0]


def test_disabled_logger_writes_nothing(tmp_path):
    m = MetricsLogger(tmp_path / "r1", enabled=False, total_steps=1)
    m.log(1, "train", {"loss": 1.0})
    m.close()
    assert not (tmp_path / "r1").exists()


def test_sqrt_scaling_and_warmup_from_zero():
    assert scaled_lr(5e-4, 16, "sqrt") == pytest.approx(2e-3) and scaled_lr(5e-4, 16, "none") == 5e-4
    with pytest.raises(ValueError, match="not one of: linear, sqrt, none"):
        scaled_lr(1.0, 2, "cube")
    lrs = [lr_at(s, base_lr=0.0, peak_lr=1.0, warmup_steps=4, total_steps=10, schedule="poly") for s in range(10)]
    assert lrs[:5] == [0.0, 0.25, 0.5, 0.75, 1.0] and lrs[-1] == pytest.approx(1 / 6)


def test_metrics_logger_appends_after_the_records_it_finds(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=10, progress="never", tensorboard=False,
                           initial_step=1)
    logger.log(2, "train", {"loss": 1.0})
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_tensorboard_events_without_importing_tensorflow(tmp_path):
    # TensorFlow is installed (the TF engine): tensorboard would import it for its file I/O unless told not to.
    code = ("import sys; from pathlib import Path; from hpctrain.metrics import MetricsLogger; "
            f"m = MetricsLogger({str(tmp_path)!r}, enabled=True, total_steps=2, progress='never'); "
            "m.log(1, 'train', {'loss': 2.5}); m.close(); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            f"print(sum(f.stat().st_size for f in Path({str(tmp_path)!r}, 'tb').glob('events.out.tfevents.*')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 0  # the scalar was written
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    events = [e for f in (tmp_path / "tb").glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()]
    values = [(v.tag, e.step) for e in events for v in e.summary.value]
    assert ("train/loss", 1) in values
