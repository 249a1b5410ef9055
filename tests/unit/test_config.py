"""Config: defaults < TOML < CLI, one-line errors naming the field and the allowed values."""
import subprocess
import sys

import pytest

from hpctrain.config import ConfigError, TrainConfig, parse


def test_defaults_and_cli_override():
    cfg = parse(["--arch", "resnet50", "--lr", "0.05", "--adasum", "--batch-size", "16"], "t")
    assert cfg.model.arch == "resnet50" and cfg.optim.lr == 0.05 and cfg.dist.adasum is True
    assert cfg.data.batch_size == 16 and cfg.data.dataset == TrainConfig().data.dataset


def test_toml_then_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\narch = "resnet34"\n[optim]\nlr = 0.2\n[dist]\nfp16_allreduce = true\n')
    cfg = parse(["--config", str(f), "--lr", "0.3"], "t")
    assert cfg.model.arch == "resnet34" and cfg.optim.lr == 0.3 and cfg.dist.fp16_allreduce is True


@pytest.mark.parametrize("argv, words", [
    (["--arch", "resnet9"],
     "model.arch (--arch): 'resnet9' is not allowed (allowed: resnet18, resnet34, resnet50, resnet101)"),
    (["--batch-size", "0"], "data.batch_size (--batch-size): 0 is below the minimum 1"),
    (["--batch-size", "many"], "'many' is not an integer"),
    (["--amp", "fp8"], "allowed: none, bf16, fp16"),
    (["--dataset", "folder"], "required with --dataset folder"),
    (["--backend", "ddp", "--adasum"], "needs --backend horovod"),
    (["--resume", "/nonexistent.pt"], "is not a checkpoint file"),
])
def test_bad_values(argv, words):
    with pytest.raises(ConfigError) as e:
        parse(argv, "t")
    assert words in str(e.value) and "\n" not in str(e.value)


TF = ["--framework", "tf"]


@pytest.mark.parametrize("argv, words", [
    (["--collective", "gloo"], "dist.collective (--collective): 'gloo' is not allowed (allowed: auto, ring, nccl)"),
    (["--collective", "ring"], "dist.collective (--collective): 'ring' needs --backend multiworker or mirrored, "
                               "not 'horovod' (allowed with 'horovod': auto)"),
    (["--backend", "ddp", "--collective", "nccl"], "'nccl' needs --backend multiworker or mirrored, not 'ddp'"),
    ([*TF, "--backend", "none", "--collective", "nccl"], "'nccl' needs --backend multiworker or mirrored, not 'none'"),
    ([*TF, "--backend", "horovod", "--collective", "ring"], "needs --backend multiworker or mirrored, not 'horovod'"),
    ([*TF, "--backend", "mirrored", "--collective", "ring"], "'ring' is the cross-worker gRPC collective of --backend "
                                                             "multiworker (allowed with mirrored: auto, nccl)"),
    ([*TF, "--backend", "multiworker", "--cpu-devices", "2"], "dist.cpu_devices (--cpu-devices): 2 needs --backend "
                                                              "mirrored, not 'multiworker' (allowed: 1)"),
    (["--cpu-devices", "4"], "dist.cpu_devices (--cpu-devices): 4 needs --backend mirrored, not 'horovod'"),
    (["--cpu-devices", "0"], "dist.cpu_devices (--cpu-devices): 0 is below the minimum 1"),
    ([*TF, "--backend", "multiworker", "--jit-compile"], "dist.jit_compile (--jit-compile): not supported with "
                                                         "--backend multiworker"),
    ([*TF, "--backend", "mirrored", "--jit-compile", "true"], "not supported with --backend mirrored"),
    (["--port-base", "1023"], "dist.port_base (--port-base): 1023 is below the minimum 1024"),
    (["--port-base", "65536"], "dist.port_base (--port-base): 65536 is above the maximum 65535"),
    (["--port-base", "x"], "dist.port_base (--port-base): 'x' is not an integer"),
    (["--backend", "multiworker"], "'multiworker' is not a backend of the torch engine (allowed with --framework "
                                   "torch: horovod, ddp, mpi, none)"),
    (["--backend", "mirrored"], "'mirrored' is not a backend of the torch engine"),
])
def test_bad_strategy_options(argv, words):
    with pytest.raises(ConfigError) as e:
        parse(argv, "t")
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [
    [*TF, "--backend", "multiworker"],
    [*TF, "--backend", "multiworker", "--collective", "ring", "--port-base", "1024"],
    [*TF, "--backend", "multiworker", "--collective", "nccl", "--port-base", "65535"],
    [*TF, "--backend", "mirrored", "--collective", "nccl"],
    [*TF, "--backend", "mirrored", "--collective", "auto", "--cpu-devices", "4"],
    [*TF, "--backend", "horovod", "--jit-compile"],  # XLA is refused only around a tf.distribute strategy
    [*TF, "--backend", "none", "--jit-compile"],
    ["--backend", "ddp", "--collective", "auto", "--cpu-devices", "1"],
])
def test_good_strategy_options(argv):
    parse(argv, "t")


def test_strategy_options_defaults_and_toml(tmp_path):
    d = TrainConfig().dist
    assert (d.collective, d.port_base, d.cpu_devices) == ("auto", 23456, 1)
    f = tmp_path / "c.toml"
    f.write_text('[dist]\nframework = "tf"\nbackend = "mirrored"\ncollective = "nccl"\ncpu_devices = 2\n'
                 'port_base = 30000\n')
    cfg = parse(["--config", str(f)], "t")
    assert (cfg.dist.backend, cfg.dist.collective, cfg.dist.cpu_devices, cfg.dist.port_base) == \
        ("mirrored", "nccl", 2, 30000)
    with pytest.raises(ConfigError, match="'ring' is the cross-worker gRPC collective"):
        parse(["--config", str(f), "--collective", "ring"], "t")  # the checks span TOML and CLI
    with pytest.raises(ConfigError, match="cpu_devices.*2 needs --backend mirrored, not 'multiworker'"):
        parse(["--config", str(f), "--backend", "multiworker", "--collective", "auto"], "t")


def test_bad_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match="unknown key optim.learning_rate"):
        parse(["--config", str(f)], "t")
    f.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\]"):
        parse(["--config", str(f)], "t")
    with pytest.raises(ConfigError, match="does not exist"):
        parse(["--config", str(tmp_path / "missing.toml")], "t")


def test_cli_errors_are_one_line_exit_2():
    # Real process: unknown option and bad choice each print one line and exit 2, before torch loads.
    for argv, words in [(["--weight-decy", "1"], "did you mean --weight-decay?"), (["--lr", "x"], "not a number"),
                        (["--lr-schedule", "linear"], "allowed: cosine, step, constant")]:
        p = subprocess.run([sys.executable, "-m", "hpctrain.resnet", *argv], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2, p.stderr
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, p.stderr
        assert "error:" in lines[0] and words in lines[0], lines[0]


def test_explicit_fields_are_the_ones_a_toml_or_a_flag_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[run]\nepochs = 1\n[optim]\nlr = 0.2\n')
    cfg = parse(["--config", str(f), "--max-steps", "5"], "t")
    assert cfg.explicit == {"run.epochs", "optim.lr", "run.max_steps"}
    assert "explicit" not in cfg.to_dict()
    assert parse([], "t").explicit == frozenset()


@pytest.mark.parametrize("epochs, max_steps, explicit, horizon, words", [
    (1, 0, (), 10, "ends after 1 epoch(s) x 10 steps = 10 steps (--epochs)"),
    (1, 25, (), 25, "ends after 25 steps (--max-steps)"),  # --max-steps alone runs past one epoch
    (1, 25, ("run.epochs",), 10, "(--epochs 1, before --max-steps 25)"),  # an explicit --epochs ends it first
    (3, 25, ("run.epochs",), 30, "ends after 25 steps (--max-steps)"),  # ... or not: the horizon stays the epochs'
])
def test_run_length(epochs, max_steps, explicit, horizon, words):
    from hpctrain.config import RunConfig
    from hpctrain.engine.trainer import run_length
    got_horizon, bound = run_length(RunConfig(epochs=epochs, max_steps=max_steps), 10, frozenset(explicit))
    assert got_horizon == horizon and words in bound


def test_bert_has_its_own_optimizer_defaults():
    from hpctrain.config import BertTrainConfig
    o = parse([], "t", BertTrainConfig).optim
    assert (o.optimizer, o.lr, o.lr_scaling, o.warmup_ratio, o.warmup_from, o.schedule) == \
        ("adamw", 5e-4, "sqrt", 0.1, "zero", "poly")
    assert parse([], "t").optim.optimizer == "sgd"  # ResNet keeps SGD with linear scaling
