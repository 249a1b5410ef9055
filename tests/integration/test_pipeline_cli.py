"""Hybrid pipeline x data parallel runs end to end through the CLIs under a real `mpirun -np 4`
(2 stages x 2 replicas), against plain Horovod data parallelism on the same global batch."""
import json

import torch

from tests.integration.test_bert_cli import BERT
from tests.launch import check_ok, metrics, run

RESNET = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--synthetic-size", "256", "--workers", "0"]


def _model(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_resnet_2_stages_x_2_replicas_equals_data_parallel_and_resumes(tmp_path):
    # Same global batch: 2 replicas x 2 micro-batches x 8 images, and the same samples per replica.
    pipe_dir, dp_dir = tmp_path / "pipe", tmp_path / "dp"
    out = check_ok(run("mpirun", 4, [*RESNET, "--run-dir", str(pipe_dir), "--pipeline-stages", "2",
                                     "--micro-batches", "2", "--max-steps", "3", "--deterministic"], timeout=300))
    assert "pipeline backend" in out and "pipeline plan (time, bottleneck/lower bound" in out
    plan = json.loads((pipe_dir / "pipeline_plan.json").read_text())
    assert len(plan["stages"]) == 2 and plan["stages"][0][0] == 0 and plan["stages"][-1][1] == 10  # 10 blocks
    check_ok(run("mpirun", 2, [*RESNET, "--run-dir", str(dp_dir), "--backend", "horovod", "--accumulate", "2",
                               "--max-steps", "3", "--deterministic"], timeout=300))
    pipe = _model(pipe_dir / "checkpoints" / "ckpt-00000003.pt")
    dp = _model(dp_dir / "checkpoints" / "ckpt-00000003.pt")
    assert pipe["model"].keys() == dp["model"].keys()  # the whole model, in torchvision's names
    worst = max(((pipe["model"][k].double() - dp["model"][k].double()).abs().max()
                 / dp["model"][k].double().abs().max().clamp_min(1e-6)).item()
                 for k in dp["model"] if dp["model"][k].is_floating_point())
    assert worst < 1e-4, worst
    p_loss = [r["loss"] for r in metrics(pipe_dir, "train")]
    d_loss = [r["loss"] for r in metrics(dp_dir, "train")]
    assert len(p_loss) == 3 and max(abs(a - b) for a, b in zip(p_loss, d_loss)) < 1e-4, (p_loss, d_loss)
    # samples/s counts each sample once, not once per stage
    last = metrics(pipe_dir, "train")[-1]
    assert abs(last["samples_per_s_total"] - 2 * last["samples_per_s_rank"]) < 1e-6 * last["samples_per_s_total"]
    # a requeued run reuses the saved plan and resumes every stage's weights and optimizer state
    out = check_ok(run("mpirun", 4, [*RESNET, "--run-dir", str(pipe_dir), "--pipeline-stages", "2",
                                     "--micro-batches", "2", "--max-steps", "5"], timeout=300))
    assert "reused plan" in out and "resumed from" in out and "done at step 5" in out


def test_bert_2_stages_x_2_replicas_saves_hf_model(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    out = check_ok(run("mpirun", 4, [*BERT, "--corpus", str(small_corpus), "--batch-size", "4", "--max-steps", "4",
                                     "--log-every", "2", "--run-dir", str(run_dir), "--pipeline-stages", "2",
                                     "--micro-batches", "2", "--pipeline-schedule", "gpipe", "--partition", "params"],
                       timeout=300))
    assert "pipeline plan (params" in out and "done at step 4" in out
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == [2, 4] and all(0 < r["loss"] < 20 for r in train)
    from transformers import BertForMaskedLM
    model = BertForMaskedLM.from_pretrained(run_dir / "hf", local_files_only=True)
    ckpt = _model(run_dir / "checkpoints" / "ckpt-00000004.pt")
    hf = model.state_dict()
    # rank 0 saved the whole trained model: both stages' weights, embeddings tied to the decoder
    for k in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight",
              "cls.predictions.transform.dense.weight"):
        assert torch.equal(hf[k], ckpt["model"][k]), k
    assert torch.equal(hf["cls.predictions.decoder.weight"], hf["bert.embeddings.word_embeddings.weight"])
    assert len(ckpt["pipeline"]["optimizers"]) == 2


def _fails(p, *needles):
    assert p.returncode == 2, f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert all(n in p.stderr for n in needles), p.stderr[-2000:]


def test_bad_pipeline_settings_fail_with_one_line(tmp_path, small_corpus):
    args = [*RESNET, "--run-dir", str(tmp_path / "r")]
    _fails(run("single", 1, [*args, "--pipeline-stages", "2", "--micro-batches", "1"]),
           "--micro-batches): 1 is fewer than the 2 stages", "allowed: >= 2")
    _fails(run("single", 1, [*args, "--partition", "balanced"]), "'balanced' is neither a method nor a plan file")
    _fails(run("single", 1, [*args, "--pipeline-stages", "2", "--accumulate", "2"]), "use --micro-batches")
    _fails(run("mpirun", 4, [*args, "--pipeline-stages", "3"]), "3 does not divide the 4 ranks (allowed: 1, 2, 4)")
    # BERT-tiny is 4 blocks: embeddings, 2 encoder layers, head
    _fails(run("mpirun", 5, [*BERT, "--corpus", str(small_corpus), "--run-dir", str(tmp_path / "b"),
                             "--pipeline-stages", "5", "--micro-batches", "5", "--preset", "tiny"]),
           "5 stages for a model of 4 blocks (embeddings .. head): allowed 1..4")
