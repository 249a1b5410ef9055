"""Tests for hpctrain.data.images: real files in tmp_path, numpy + Pillow only."""
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpctrain.data.images import (
    MEAN,
    SHAPE_CLASSES,
    STD,
    DataError,
    ShapesSource,
    _random_resized_crop_box,
    build_image_sources,
)

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["dog", "cat", "fish"]  # created unsorted on purpose


def _shapes(**kw):
    args = dict(dataset="shapes", path=None, image_size=32, num_classes=10, seed=0)
    return build_image_sources(**{**args, **kw})


def _textured(w, h, seed):
    """A gradient plus noise, so different crops give different pixels."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    img = (x + y) / 2 + rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _make_tree(root: Path, classes=CLASSES, val_classes=("cat", "fish")):
    """root/{train,val}/<class>/: 4 JPEGs + 2 PNGs per train class, 2 JPEGs per val class."""
    for i, c in enumerate(classes):
        d = root / "train" / c
        d.mkdir(parents=True)
        for k in range(4):
            _textured(40 + 9 * k, 30 + 7 * k, seed=10 * i + k).save(d / f"img{k}.jpg")
        for k in range(2):
            _textured(50 + 11 * k, 64 - 5 * k, seed=100 + 10 * i + k).save(d / f"pic{k}.png")
    (root / "val").mkdir()
    for i, c in enumerate(val_classes):
        d = root / "val" / c
        d.mkdir(parents=True)
        for k in range(2):
            _textured(48 + 5 * k, 36, seed=200 + 10 * i + k).save(d / f"v{k}.jpg")
    return root


def _folder(root, **kw):
    logs = []
    args = dict(dataset="folder", path=None if root is None else str(root), image_size=32,
                num_classes=3, seed=0, log=logs.append)
    train, val = build_image_sources(**{**args, **kw})
    return train, val, logs


# ---------------------------------------------------------------- shapes

def test_shapes_outputs_and_labels():
    train, val = _shapes()
    assert (len(train), len(val)) == (10_000, 2_000)
    assert train.num_classes == 10 and train.image_size == 32
    labels = set()
    for i in range(200):
        x, y = train[i, 0]
        assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
        assert isinstance(y, int) and 0 <= y < 10
        labels.add(y)
    assert labels == set(range(10))


@pytest.mark.parametrize("size", [8, 57, 224])
def test_shapes_other_sizes(size):
    train, _ = _shapes(image_size=size)
    x, _ = train[3, 1]
    assert x.shape == (3, size, size) and np.isfinite(x).all()


def test_shapes_deterministic_flip_only_across_epochs():
    train, val = _shapes()
    for i in range(20):
        a, ya = train[i, 0]
        b, yb = train[i, 0]
        assert np.array_equal(a, b) and ya == yb
    flipped = 0
    for i in range(20):
        base, label = train[i, 0]
        for epoch in (1, 2, 3):
            x, y = train[i, epoch]
            assert y == label
            # Same content every epoch; only the horizontal flip may change.
            assert np.array_equal(x, base) or np.array_equal(x, base[:, :, ::-1])
            flipped += not np.array_equal(x, base)
    assert 0 < flipped < 60
    # Validation is never augmented; a plain int key means epoch 0.
    assert np.array_equal(val[5, 0][0], val[5, 7][0])
    assert np.array_equal(train[5][0], train[5, 0][0])


def test_shapes_seed_and_split_change_content():
    train, val = _shapes()
    tr = np.stack([train[i, 0][0] for i in range(100)]).reshape(100, -1)
    va = np.stack([val[i, 0][0] for i in range(100)]).reshape(100, -1)
    # No val image equals any train image (nor its mirror image).
    assert not (tr[:, None] == va[None]).all(-1).any()
    tr_m = np.stack([train[i, 0][0][:, :, ::-1] for i in range(100)]).reshape(100, -1)
    assert not (tr_m[:, None] == va[None]).all(-1).any()
    other, _ = _shapes(seed=1)
    assert not np.array_equal(other[0, 0][0], train[0, 0][0])


def test_shapes_num_classes():
    with pytest.raises(DataError, match="num_classes=7"):
        _shapes(num_classes=7)
    train, _ = _shapes(num_classes=0)  # 0 = take it from the dataset
    assert train.num_classes == 10 and train.classes == list(SHAPE_CLASSES)


def test_shapes_are_learnable():
    """Nearest-centroid on translation- and polarity-invariant features beats chance (10%)."""
    train, val = _shapes()

    def load(src, n):
        xs, ys = zip(*(src[i, 0] for i in range(n)))
        return np.stack(xs), np.array(ys)

    def features(x):
        gray = x.mean(1)
        border = np.concatenate([gray[:, 0], gray[:, -1], gray[:, :, 0], gray[:, :, -1]], 1)
        fg = np.abs(gray - np.median(border, 1)[:, None, None])  # shape map, whatever the colours
        return np.log1p(np.abs(np.fft.rfft2(fg))[:, :16].reshape(len(x), -1))  # position-free

    xtr, ytr = load(train, 2000)
    xva, yva = load(val, 500)
    ftr, fva = features(xtr), features(xva)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    centroids = np.stack([ftr[ytr == c].mean(0) for c in range(10)])
    pred = ((fva[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = (pred == yva).mean()
    print(f"shapes nearest-centroid val accuracy: {accuracy:.3f}")
    assert accuracy > 0.25


# ---------------------------------------------------------------- synthetic

def test_synthetic():
    train, val = build_image_sources("synthetic", None, 32, 1000, seed=3, synthetic_size=100)
    assert (len(train), len(val)) == (100, 12)
    x, y = train[4, 0]
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    assert 0 <= y < 1000
    assert np.array_equal(train[4, 0][0], x) and train[4, 0][1] == y
    assert not np.array_equal(train[5, 0][0], x)
    assert not np.array_equal(val[4, 0][0], x)
    labels = {train[i, 0][1] for i in range(100)}
    assert len(labels) > 50  # random labels over 1000 classes, not a constant
    _, tiny_val = build_image_sources("synthetic", None, 32, 10, 0, synthetic_size=3)
    assert len(tiny_val) == 1
    with pytest.raises(DataError, match="num_classes"):
        build_image_sources("synthetic", None, 32, 0, 0)


def test_bad_arguments():
    with pytest.raises(DataError, match="imagenet.*shapes, synthetic, folder"):
        build_image_sources("imagenet", None, 32, 10, 0)
    with pytest.raises(DataError, match="image_size.*4"):
        build_image_sources("shapes", None, 4, 10, 0)
    train, _ = _shapes()
    with pytest.raises(IndexError):
        train[10_000, 0]


def test_images_module_does_not_import_frameworks():
    code = ("import sys, hpctrain.data.images; "
            "bad = {'torch', 'tensorflow'} & set(sys.modules); assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- folder

def test_folder_layout_labels_and_shapes(tmp_path):
    train, val, logs = _folder(_make_tree(tmp_path))
    assert train.classes == ["cat", "dog", "fish"] and val.classes == train.classes
    assert (len(train), len(val)) == (18, 4)
    for src in (train, val):
        for i in range(len(src)):
            x, y = src[i, 0]
            assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
            assert Path(src.path(i)).parent.name == train.classes[y]
    # val has only cat and fish: labels must still be train's indices.
    assert sorted({val[i][1] for i in range(len(val))}) == [0, 2]
    # Deterministic order: class, then path.
    assert [Path(train.path(i)).name for i in range(6)] == [
        "img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "pic0.png", "pic1.png"]
    assert any("18 train / 4 val" in m for m in logs)


def test_folder_num_classes_from_folder_and_mismatch(tmp_path):
    root = _make_tree(tmp_path)
    train, _, _ = _folder(root, num_classes=0)
    assert train.num_classes == 3
    with pytest.raises(DataError, match=r"num_classes=1000.*3 class"):
        _folder(root, num_classes=1000)


def test_folder_augmentation_is_keyed(tmp_path):
    train, val, _ = _folder(_make_tree(tmp_path))
    for i in (0, 5, 11):
        assert np.array_equal(train[i, 3][0], train[i, 3][0])
        assert np.array_equal(val[i % 4, 0][0], val[i % 4, 9][0])  # val: no randomness
    # A fresh source (another process / worker) gives the same sample for the same key.
    again, _, _ = _folder(tmp_path)
    assert np.array_equal(again[7, 2][0], train[7, 2][0])
    differs = [not np.array_equal(train[i, 0][0], train[i, 1][0]) for i in range(6)]
    assert all(differs)


def test_sources_survive_pickling(tmp_path):
    """Loader workers started with 'spawn' get pickled copies: they must give identical samples."""
    folder_train, _, _ = _folder(_make_tree(tmp_path))
    synthetic, _ = build_image_sources("synthetic", None, 32, 10, 0)
    for src in (folder_train, synthetic, _shapes()[0]):
        copy = pickle.loads(pickle.dumps(src))
        assert np.array_equal(copy[3, 2][0], src[3, 2][0]) and copy[3, 2][1] == src[3, 2][1]


def test_folder_train_flips_horizontally(tmp_path):
    root = _make_tree(tmp_path)
    ramp = np.repeat(np.linspace(0, 255, 80)[None, :, None], 60, 0).repeat(3, 2)
    Image.fromarray(ramp.astype(np.uint8)).save(root / "train" / "cat" / "ramp.png")
    train, val, _ = _folder(root)
    i = next(i for i in range(len(train)) if train.path(i).endswith("ramp.png"))
    # Any crop of a dark-to-bright ramp stays dark-to-bright unless mirrored.
    mirrored = [train[i, e][0][:, :, 0].mean() > train[i, e][0][:, :, -1].mean() for e in range(30)]
    assert 5 <= sum(mirrored) <= 25


def test_folder_val_normalization_of_black_image(tmp_path):
    root = _make_tree(tmp_path)
    Image.new("RGB", (45, 37)).save(root / "val" / "cat" / "black.png")
    _, val, _ = _folder(root)
    i = next(i for i in range(len(val)) if val.path(i).endswith("black.png"))
    x, _ = val[i]
    np.testing.assert_allclose(x, np.broadcast_to((-MEAN / STD)[:, None, None], x.shape),
                               atol=1e-5)


@pytest.mark.parametrize("size,ext", [((47, 90), "png"), ((400, 300), "jpg")])
def test_folder_val_matches_resize_then_center_crop(tmp_path, size, ext):
    """Val = Resize(round(S / 0.875)) + CenterCrop(S), torchvision style, done in two steps here."""
    root = _make_tree(tmp_path)
    w, h = size
    grad = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    img = Image.fromarray(np.repeat(grad, 3, 2).astype(np.uint8))
    img.save(root / "val" / "cat" / f"grad.{ext}")
    _, val, _ = _folder(root)
    i = next(i for i in range(len(val)) if val.path(i).endswith(f"grad.{ext}"))
    short = round(32 / 0.875)
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    with Image.open(val.path(i)) as im:
        ref = im.convert("RGB").resize(new, Image.BILINEAR)
    left, top = round((new[0] - 32) / 2), round((new[1] - 32) / 2)
    ref = np.asarray(ref.crop((left, top, left + 32, top + 32)), np.float32)
    expected = ((ref / 255 - MEAN) / STD).transpose(2, 0, 1)
    # PNG is decoded exactly; the JPEG goes through the reduced-scale (draft) decode.
    assert np.abs(val[i][0] - expected).mean() < (0.02 if ext == "png" else 0.1)


def test_random_resized_crop_box():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = _random_resized_crop_box(120, 80, rng)
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 120 and 0 <= top and bottom <= 80
        assert 0.08 * 9600 * 0.8 <= w * h <= 9600 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # A 1000x10 strip never fits a valid crop: fall back to the centre, ratio clamped to 4/3.
    assert _random_resized_crop_box(1000, 10, rng) == (493, 0, 506, 10)


def test_folder_skips_unreadable_files(tmp_path):
    root = _make_tree(tmp_path)
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(500))
    train, _, logs = _folder(root)
    assert len(train) == 18
    assert all(not train.path(i).endswith("broken.jpg") for i in range(len(train)))
    msg = [m for m in logs if "skipped" in m]
    assert len(msg) == 1 and "skipped 1 unreadable" in msg[0] and "broken.jpg" in msg[0]
    assert str(root / "train") in msg[0]


def test_folder_decode_failure_substitutes_next_image(tmp_path):
    root = _make_tree(tmp_path)
    (root / "train" / "cat" / "img2.jpg").write_bytes(b"not a jpeg at all")
    train, _, logs = _folder(root, verify=False)
    assert len(train) == 18  # not verified: the bad file is still listed
    i = next(i for i in range(len(train)) if train.path(i).endswith("cat/img2.jpg"))
    x, y = train[i, 4]
    assert np.array_equal(x, train[i, 4][0]) and y == train[i + 1, 0][1]
    # img3.jpg, cropped with the augmentation drawn for the original key (index i, epoch 4).
    assert train.path(i + 1).endswith("cat/img3.jpg")
    assert np.array_equal(x, train._load(train.path(i + 1), np.random.default_rng([0, 4, i])))
    warnings = [m for m in logs if "cannot decode" in m]
    assert len(warnings) == 1 and "img2.jpg" in warnings[0]  # once per file, not per access


def test_folder_all_unreadable(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "train" / c / "x.jpg").write_bytes(b"\x00garbage")
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="all 2 image.*unreadable"):
        _folder(tmp_path, num_classes=2)


def test_folder_missing_or_empty(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        _folder(missing)
    with pytest.raises(DataError, match="needs a path"):
        _folder(None)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train"))):
        _folder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images.*" + re.escape(str(tmp_path / "train"))):
        _folder(tmp_path, num_classes=0)


def test_folder_flat_val_and_unknown_val_class(tmp_path):
    root = _make_tree(tmp_path, val_classes=())
    _textured(40, 40, 0).save(root / "val" / "flat.jpg")  # raw ImageNet val: no class dirs
    with pytest.raises(DataError, match="no images.*<class>"):
        _folder(root)
    (root / "val" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        _folder(root)


# ---------------------------------------------------------------- layout

def _check_hwc_is_chw_transposed(chw_sources, hwc_sources, keys):
    for chw, hwc in zip(chw_sources, hwc_sources):
        assert (chw.layout, hwc.layout) == ("chw", "hwc")
        for key in keys:
            x, y = chw[key]
            xh, yh = hwc[key]
            s = chw.image_size
            assert x.shape == (3, s, s) and xh.shape == (s, s, 3)
            assert xh.dtype == np.float32 and xh.flags.c_contiguous and x.flags.c_contiguous
            assert np.array_equal(xh, x.transpose(1, 2, 0)) and yh == y


def test_hwc_layout_is_chw_transposed_shapes_and_synthetic():
    keys = [(i, e) for i in range(8) for e in (0, 1, 2)] + [5]  # epochs 1, 2: flipped and not
    _check_hwc_is_chw_transposed(_shapes(), _shapes(layout="hwc"), keys)
    args = ("synthetic", None, 32, 10, 3)
    _check_hwc_is_chw_transposed(build_image_sources(*args, synthetic_size=64),
                                 build_image_sources(*args, synthetic_size=64, layout="hwc"), keys)


def test_hwc_layout_is_chw_transposed_folder(tmp_path):
    root = _make_tree(tmp_path)
    chw, hwc = _folder(root)[:2], _folder(root, layout="hwc")[:2]
    _check_hwc_is_chw_transposed(chw, hwc, [(i, e) for i in range(4) for e in (0, 1, 3)])


def test_hwc_source_survives_pickling():
    src = _shapes(layout="hwc")[0]
    copy = pickle.loads(pickle.dumps(src))
    assert copy.layout == "hwc" and np.array_equal(copy[3, 2][0], src[3, 2][0])


@pytest.mark.parametrize("bad", ["nhwc", "CHW", "", None])
def test_bad_layout_names_the_value_and_the_choices(bad):
    with pytest.raises(DataError, match=re.escape(repr(bad)) + ".*chw, hwc"):
        _shapes(layout=bad)
    with pytest.raises(DataError, match=re.escape(repr(bad))):
        ShapesSource(10, 32, 0, True, layout=bad)


def test_torch_loader_worker_errors_come_back_as_our_own_line():
    from hpctrain.engine.torch.util import worker_message
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in <module>\nhpctrain.data.images.DataError: 64 consecutive images from '
               "/d/a.jpg on cannot be decoded\n")
    assert worker_message(wrapped) == "64 consecutive images from /d/a.jpg on cannot be decoded"
    assert worker_message("a plain message: with a colon") == "a plain message: with a colon"


def test_fewer_than_two_classes_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"data.num_classes \(--num-classes\): 1 for dataset 'synthetic' "
                                        r"\(allowed: 2 or more"):
        build_image_sources("synthetic", None, 32, 1, 0)
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "only" / "a.png")
    with pytest.raises(DataError, match=r"holds images of 1 class\(es\): a classifier needs 2 or more"):
        _folder(tmp_path, num_classes=0)
