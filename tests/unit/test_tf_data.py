"""The TF engine reads the same samples in the same order as the torch driver: the neutral sources and
sharded sampler feed both; only the image layout differs (HWC for Keras). Also the .npz checkpoint
round trip and its non-finite check."""
import numpy as np
import pytest
import torch

from hpctrain.data.images import build_image_sources
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.data.text import MLMSource, TokenShards, prepare
from hpctrain.engine.tf.data import BatchStream
from hpctrain.engine.torch.util import make_loader
from tests.unit.test_text import write_corpus


def samplers(n, rank, contiguous=False):
    return [ShardedBatchSampler(n, rank, 2, 4, seed=3, contiguous=contiguous) for _ in range(2)]


@pytest.mark.parametrize("rank", [0, 1])
def test_images_same_order_as_torch_channels_last(rank):
    chw, _ = build_image_sources("shapes", None, 16, 10, seed=5, log=lambda *_: None)
    hwc, _ = build_image_sources("shapes", None, 16, 10, seed=5, log=lambda *_: None, layout="hwc")
    s_torch, s_tf = samplers(len(chw), rank)
    loader, stream = make_loader(chw, s_torch, 0, torch.device("cpu")), BatchStream(hwc, s_tf)
    for epoch, skip in ((0, 0), (1, 3)):  # a new epoch's order, and a mid-epoch resume
        s_torch.set_epoch(epoch, skip_batches=skip)
        torch_batches = [(x.numpy(), y.numpy()) for x, y in loader]
        tf_batches = [(x.numpy(), y.numpy()) for x, y in stream.epoch(epoch, skip)]
        assert len(tf_batches) == len(torch_batches) == len(s_tf) - skip > 0
        for (xt, yt), (xk, yk) in zip(torch_batches, tf_batches):
            np.testing.assert_array_equal(yt, yk)
            np.testing.assert_array_equal(xt.transpose(0, 2, 3, 1), xk)


def test_mlm_masks_same_as_torch(tmp_path):
    prepare([str(write_corpus(tmp_path / "raw", lines=200))], str(tmp_path / "c"), vocab_size=200, seq_len=16,
            workers=1, log=lambda *_: None)
    src = MLMSource(TokenShards(tmp_path / "c"), seed=9)
    s_torch, s_tf = samplers(len(src), 1, contiguous=True)
    s_torch.set_epoch(2)
    torch_batches = list(make_loader(src, s_torch, 0, torch.device("cpu")))
    tf_batches = list(BatchStream(src, s_tf).epoch(2, 0))
    assert len(torch_batches) == len(tf_batches) > 0
    for bt, bk in zip(torch_batches, tf_batches):
        assert set(bt) == set(bk)
        for k in bt:
            np.testing.assert_array_equal(bt[k].numpy(), bk[k].numpy())
        assert (bk["labels"].numpy() != -100).any()  # masked positions exist


def test_npz_checkpoint_round_trip_and_nonfinite(tmp_path):
    from hpctrain.engine.tf.trainer import Trainer
    state = {"model": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3)], "optimizer": [np.int64(4)],
             "step": 7, "world_size": 2, "config": {"run": {"seed": 1}}}
    with open(tmp_path / "c.npz", "wb") as f:
        Trainer.write_state(state, f)
    back = Trainer.read_state(tmp_path / "c.npz")
    assert back["step"] == 7 and back["world_size"] == 2 and back["config"] == {"run": {"seed": 1}}
    assert all(np.array_equal(a, b) for a, b in zip(back["model"], state["model"]))
    assert Trainer.nonfinite(back) is None
    state["model"][1][2] = np.nan
    assert "model weight #1" in Trainer.nonfinite(state)
