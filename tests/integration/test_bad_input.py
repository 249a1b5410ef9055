"""Bad input under `mpirun -np 2`: one line for the whole job, naming the bad value, exit 2, no traceback.
And what every rank prints stays whole lines under horovodrun's output tags."""
import re

import pytest

from tests.launch import check_ok, run

RESNET = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml"]
BERT = ["-m", "hpctrain.bert", "--config", "configs/bert_tiny.toml"]
ERROR_LINE = re.compile(r"error( \(rank \d+\))?: ")

TABLE = [
    (RESNET, ["--lr", "nan"], "optim.lr (--lr): 'nan' is not a finite number"),
    (RESNET, ["--lr", "inf"], "optim.lr (--lr): 'inf' is not a finite number"),
    (RESNET, ["--warmup-epochs=-inf"], "'-inf' is not a finite number"),
    (RESNET, ["--backend", "none"], "'none' runs one process, but the launcher started 2 ranks"),
    (RESNET, ["--batch-size", "0"], "data.batch_size (--batch-size): 0 is below the minimum 1"),
    (RESNET, ["--optimiser", "adamw"], "did you mean --optimizer"),
    (RESNET, ["--arch", "resnet19"], "'resnet19' is not allowed (allowed: resnet18"),
    (RESNET, ["--config", "MISSING.toml"], "'MISSING.toml' does not exist"),
    (RESNET, ["--dataset", "folder", "--path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (RESNET, ["--resume", "/nonexistent/ckpt.pt"], "'/nonexistent/ckpt.pt' is not a checkpoint file"),
    (RESNET, ["--pipeline-stages", "3"], "3"),
    (RESNET, ["--synthetic-size", "16", "--batch-size", "16"], "not one step per epoch"),
    (BERT, ["--mask-prob", "1.5"], "data.mask_prob (--mask-prob): 1.5 is above the maximum 1.0"),
    (BERT, ["--model-path", "NOT_A_MODEL"], "could not be loaded as a BERT model"),
]


@pytest.mark.parametrize("entry, argv, words", TABLE, ids=[" ".join(a) for _, a, _ in TABLE])
def test_bad_input_under_two_ranks_is_one_line_exit_2(tmp_path, entry, argv, words):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"hello": "this is not a model config"}')
    argv = [str(not_a_model) if a == "NOT_A_MODEL" else a for a in argv]
    p = run("mpirun", 2, [*entry, "--run-dir", str(tmp_path / "run"), *argv], timeout=180)
    output = p.stdout + p.stderr
    errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
    assert p.returncode == 2, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert words in errors[0], errors[0]
    assert "Traceback" not in output


@pytest.mark.parametrize("entry", [RESNET[:2], BERT[:2]], ids=["resnet", "bert"])
def test_help_works(entry):
    out = check_ok(run("single", 1, [*entry, "--help"], timeout=60))
    assert "--run-dir" in out and "--lr" in out
    if "bert" in entry[1]:
        assert "(80% [MASK], 10% random" in " ".join(out.split())  # '%' in a help text: printed, not a format
    assert "(default: None)" not in out  # each option's help states its own default, once


def test_every_line_is_one_write_under_horovodrun_tags(tmp_path):
    # tests.launch.env() sets PYTHONUNBUFFERED=1, as clusters and containers commonly do: print() then
    # writes text and newline separately unless each line goes out in one write; horovodrun's
    # --tag-output would tag the bare newline ("...[1,0]<stdout>:").
    p = run("horovodrun", 2, [*RESNET, "--run-dir", str(tmp_path / "run"), "--max-steps", "3"])
    out = check_ok(p)
    lines = out.splitlines()
    assert any("<stdout>:" in line for line in lines), out[-2000:]  # tagged output, as the demo prints it
    glued = [line for line in lines if re.search(r"<std(out|err)>:\s*$", line)
             or len(re.findall(r"\[\d+,\d+\]<std(out|err)>:", line)) > 1]
    assert glued == [], glued[:5]
