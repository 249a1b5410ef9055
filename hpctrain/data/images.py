"""Image datasets as framework-neutral sources: numpy + Pillow only, never torch or tensorflow.

A source is indexed by a key `(index, epoch)` and returns `(float32 image, int label)`, the image
normalized with the ImageNet mean/std, channels first (layout "chw", PyTorch) or last ("hwc",
TensorFlow). Every random choice for a sample is drawn from a
generator seeded from (seed, epoch, index) -- or from (seed, index, split) for content that must
stay fixed across epochs -- never from global RNG state, so a sample is the same whatever the number
of loader workers, and a run resumed in the middle of an epoch sees exactly the images it would
have seen.

Datasets: "synthetic" (noise, for throughput benchmarks), "shapes" (built-in, no download: 10
classes of geometric shapes that a small CNN learns in about a minute on a CPU) and "folder"
(ImageNet layout: path/train/<class>/*.jpg, path/val/<class>/*.jpg).
"""
from __future__ import annotations

import abc
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from PIL import Image

from hpctrain.choices import DATASETS
from hpctrain.errors import DataError

LAYOUTS = ("chw", "hwc")  # channels first (PyTorch) or last (TensorFlow)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SHAPE_CLASSES = ("disk", "ring", "square_outline", "filled_square", "triangle",
                 "horizontal_bar", "vertical_bar", "plus", "diagonal_cross", "two_dots")
SHAPES_TRAIN_SIZE, SHAPES_VAL_SIZE = 10_000, 2_000
_TRAIN, _VAL = 0, 1
_MAX_SUBSTITUTES = 100  # consecutive undecodable files tolerated before giving up on a sample
_VERIFY_THREADS = 16    # opening files is latency-bound on parallel file systems, not CPU-bound

Log = Callable[[str], object]


def _content_rng(seed: int, split: int, index: int) -> np.random.Generator:
    # SeedSequence pads its entropy with zeros to 4 words, so a plain [seed, index] would be the
    # same stream as the augmentation key [seed, epoch=index, index=0]. A non-zero 4th word keeps
    # content and augmentation streams apart; `split` keeps val content different from train.
    return np.random.default_rng([seed, index, split, 1])


def _augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise DataError(f"unknown image layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    return layout


class ImageSource(abc.ABC):
    """Indexable by (index, epoch) -> (C-contiguous float32 normalized image, int label); the image
    is (3, S, S) for layout "chw", (S, S, 3) for "hwc".

    A plain int key means (index, epoch=0), so a source also works as an ordinary sequence.
    Subclasses produce CHW in `_sample` (a view is fine); the layout is applied once, here.
    """

    def __init__(self, length: int, num_classes: int, image_size: int, seed: int, train: bool,
                 classes: list[str], layout: str = "chw"):
        self.length, self.num_classes, self.image_size = length, num_classes, image_size
        self.seed, self.train, self.classes = seed, train, classes
        self.layout = check_layout(layout)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[np.ndarray, int]:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        if not 0 <= index < self.length:
            raise IndexError(f"sample index {index} out of range 0..{self.length - 1}")
        image, label = self._sample(int(index), int(epoch))
        if self.layout == "hwc":
            image = image.transpose(1, 2, 0)
        return np.ascontiguousarray(image), label  # no copy when already contiguous

    @abc.abstractmethod
    def _sample(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
        """Return sample `index` as seen in `epoch` (index already range-checked), as a float32
        (3, S, S) array, not necessarily contiguous."""


class SyntheticSource(ImageSource):
    """Noise images with random labels, for throughput benchmarks: one array copy per sample (a
    second one for layout "hwc")."""

    _BANK = 8  # pre-drawn noise images; drawing fresh noise per sample costs ~1-2 ms at 224 px

    def __init__(self, length: int, num_classes: int, image_size: int, seed: int, train: bool,
                 layout: str = "chw"):
        super().__init__(length, num_classes, image_size, seed, train,
                         [str(c) for c in range(num_classes)], layout)
        self._split = _TRAIN if train else _VAL
        self._bank: np.ndarray | None = None  # lazy: pickled copies sent to workers stay small

    def _sample(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
        size = self.image_size
        if self._bank is None:
            # 4th word 2: a stream no per-sample key uses.
            bank_rng = np.random.default_rng([self.seed, self._split, 0, 2])
            self._bank = bank_rng.standard_normal((self._BANK, 3, size, size), dtype=np.float32)
        rng = _content_rng(self.seed, self._split, index)
        label = int(rng.integers(self.num_classes))
        # A random bank image rolled by a random offset: a different image per index for one copy.
        image = np.roll(self._bank[rng.integers(self._BANK)], int(rng.integers(size)), axis=2)
        return image, label


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :], c[:, None]  # x along columns, y along rows: masks come from broadcasting


def _shape_mask(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size, size) mask of shape class `label` at a random position and size.

    Every class is mirror-symmetric about a vertical axis (two_dots maps to two_dots), so a
    horizontal flip never changes the class.
    """
    r = rng.uniform(0.18, 0.42) * size                # half-extent of the shape
    cx, cy = rng.uniform(r, size - r, 2)              # fully inside the image
    t = max(1.5, r * rng.uniform(0.25, 0.4))          # stroke width; >= 1.5 px to survive at 32 px
    x, y = _pixel_centres(size)
    dx, dy = x - cx, y - cy
    ax, ay = np.abs(dx), np.abs(dy)
    box = np.maximum(ax, ay)
    name = SHAPE_CLASSES[label]
    if name == "disk":
        return dx * dx + dy * dy <= r * r
    if name == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (r - t) ** 2)
    if name == "square_outline":
        return (box <= r) & (box >= r - t)
    if name == "filled_square":
        return box <= r
    if name == "triangle":                            # apex up, base 2r wide at the bottom
        return (ay <= r) & (ax <= (dy + r) * 0.5)
    hbar = (ax <= r) & (ay <= t / 2)
    vbar = (ay <= r) & (ax <= t / 2)
    if name == "horizontal_bar":
        return hbar
    if name == "vertical_bar":
        return vbar
    if name == "plus":
        return hbar | vbar
    if name == "diagonal_cross":
        return (box <= r) & (np.abs(ax - ay) <= t * 0.71)  # 0.71 ~ 1/sqrt(2): stroke width t
    # two_dots, at a random orientation
    angle = rng.uniform(0, math.pi)
    ox, oy, rd2 = 0.6 * r * math.cos(angle), 0.6 * r * math.sin(angle), (0.35 * r) ** 2
    return ((dx - ox) ** 2 + (dy - oy) ** 2 <= rd2) | ((dx + ox) ** 2 + (dy + oy) ** 2 <= rd2)


class ShapesSource(ImageSource):
    """Built-in 10-class geometric-shapes dataset, generated from (seed, index) with numpy.

    Position, size, stroke width, colours and pixel noise are random, so only the shape tells the
    class. Content is fixed per index; training adds a random horizontal flip per (epoch, index).
    """

    def __init__(self, length: int, image_size: int, seed: int, train: bool, layout: str = "chw"):
        super().__init__(length, len(SHAPE_CLASSES), image_size, seed, train, list(SHAPE_CLASSES),
                         layout)
        self._split = _TRAIN if train else _VAL

    def _sample(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
        size = self.image_size
        rng = _content_rng(self.seed, self._split, index)
        label = int(rng.integers(len(SHAPE_CLASSES)))
        mask = _shape_mask(label, size, rng)
        bg = rng.uniform(0, 1, 3)
        # The foreground differs from the background by 0.15..0.5 in every channel (wrapping at 1):
        # the shape is always visible, but colour carries no class information.
        fg = (bg + rng.uniform(0.3, 0.7) + rng.uniform(-0.15, 0.15, 3)) % 1.0
        bg_n, fg_n = ((bg - MEAN) / STD).astype(np.float32), ((fg - MEAN) / STD).astype(np.float32)
        # Normalization is folded into the colours and the noise scale: no pass over the image.
        image = rng.standard_normal((3, size, size), dtype=np.float32)
        image *= (0.05 / STD)[:, None, None]
        image += bg_n[:, None, None]
        image += (fg_n - bg_n)[:, None, None] * mask
        if self.train and _augment_rng(self.seed, epoch, index).random() < 0.5:
            image = image[:, :, ::-1]  # a view: made contiguous (in the chosen layout) by __getitem__
        return image, label


def _random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[float, ...]:
    """torchvision's RandomResizedCrop.get_params, as a (left, top, right, bottom) box."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # Fallback: the central crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _center_crop_box(width: int, height: int, size: int) -> tuple[float, ...]:
    """Resize(round(size / 0.875)) + CenterCrop(size), as the box of the original image it keeps."""
    short = round(size / 0.875)
    if width <= height:  # torchvision's Resize(int): shorter side to `short`, longer side truncated
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


class FolderSource(ImageSource):
    """Images listed from an ImageNet-layout split directory, decoded with Pillow per sample."""

    def __init__(self, root: str, files: list[str], labels: list[int], classes: list[str],
                 image_size: int, seed: int, train: bool, log: Log, layout: str = "chw"):
        super().__init__(len(files), len(classes), image_size, seed, train, classes, layout)
        self.root, self.log = root, log
        # Bytes in one numpy array instead of a list of str: a million-entry Python list costs
        # ~100 MB per loader worker, because refcount updates copy the forked pages.
        self._files = np.array([os.fsencode(f) for f in files])
        self.labels = np.asarray(labels, dtype=np.int32)
        self._warned: set[str] = set()  # per process: each worker warns once per bad file

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._files[index]))

    def _sample(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
        # A file that passed the scan can still fail to decode (truncated JPEG, file system hiccup):
        # substitute the next index, deterministically, rather than kill a multi-node job.
        for step in range(min(self.length, _MAX_SUBSTITUTES)):
            i = (index + step) % self.length
            path = self.path(i)
            try:
                return self._load(path, _augment_rng(self.seed, epoch, index)), int(self.labels[i])
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
                if path not in self._warned:
                    self._warned.add(path)
                    self.log(f"warning: cannot decode {path} ({type(exc).__name__}: {exc}); "
                             f"substituting the next image")
        raise DataError(f"{min(self.length, _MAX_SUBSTITUTES)} consecutive images from "
                        f"{self.path(index)} on cannot be decoded")

    def _load(self, path: str, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        with Image.open(path) as im:
            width, height = im.size
            if self.train:
                box = _random_resized_crop_box(width, height, rng)
            else:
                box = _center_crop_box(width, height, size)
            # JPEGs decode at 1/2, 1/4 or 1/8 scale almost for free: ask for the smallest scale
            # that still leaves the crop at least `size` pixels wide and tall (no-op for PNG etc.).
            left, top, right, bottom = box
            im.draft("RGB", (math.ceil(width * size / (right - left)),
                             math.ceil(height * size / (bottom - top))))
            sx, sy = im.size[0] / width, im.size[1] / height
            # Crop + bilinear (antialiased) resize in one step, like torchvision's resized_crop.
            im = im.convert("RGB").resize((size, size), Image.BILINEAR,
                                          box=(left * sx, top * sy, right * sx, bottom * sy))
        hwc = np.asarray(im, dtype=np.float32)
        if self.train and rng.random() < 0.5:
            hwc = hwc[:, ::-1]
        hwc = hwc * (1 / (255 * STD)) - MEAN / STD
        return hwc.transpose(2, 0, 1)  # a CHW view: __getitem__ makes the one contiguous copy it needs


def _class_dirs(split_dir: str) -> list[str]:
    # Hidden directories (.ipynb_checkpoints, ...) are never classes.
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: str) -> list[str]:
    """Image files under class_dir (recursive, like ImageFolder), sorted; dotfiles such as macOS
    '._x.jpg' resource forks are skipped."""
    found = []
    for dirpath, _, filenames in os.walk(class_dir, followlinks=True):
        found += [os.path.join(dirpath, f) for f in filenames
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def _check_image(path: str) -> str | None:
    """None if Pillow can open and verify the file, else the reason."""
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as exc:  # Pillow raises many exception types for bad files
        return f"{type(exc).__name__}: {exc}"


def _scan_split(split_dir: str, classes: list[tuple[int, str]], verify: bool, log: Log,
                pool: ThreadPoolExecutor) -> tuple[list[str], list[int]]:
    """(paths relative to split_dir, labels) of the readable images of `classes` (label, name)."""
    files, labels, bad, empty = [], [], [], []
    for label, name in classes:
        paths = _image_files(os.path.join(split_dir, name))
        if not paths:
            empty.append(name)
        # Verified one class at a time: bounds the number of pending futures on ImageNet-size trees.
        errors = pool.map(_check_image, paths) if verify else [None] * len(paths)
        for p, err in zip(paths, errors):
            if err is None:
                files.append(os.path.relpath(p, split_dir))
                labels.append(label)
            else:
                bad.append((p, err))
    if not files and not bad:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {split_dir}; expected "
                        f"{os.path.join(split_dir, '<class>', '<image>')}")
    if bad:
        log(f"folder dataset: skipped {len(bad)} unreadable image(s) in {split_dir} "
            f"(e.g. {bad[0][0]}: {bad[0][1]})")
    if not files:
        raise DataError(f"all {len(bad)} image(s) in {split_dir} are unreadable (e.g. {bad[0][0]})")
    if empty:
        log(f"folder dataset: {len(empty)} class dir(s) in {split_dir} hold no images "
            f"(e.g. {empty[0]})")
    return files, labels


def _build_folder(path: str | None, image_size: int, num_classes: int, seed: int, verify: bool,
                  log: Log, layout: str = "chw") -> tuple[FolderSource, FolderSource]:
    if not path:
        raise DataError("dataset 'folder' needs a path (a directory holding train/ and val/)")
    if not os.path.isdir(path):
        raise DataError(f"dataset path {path} does not exist or is not a directory")
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"missing directory {d}: the folder dataset expects "
                            f"{path}/train/<class>/*.jpg and {path}/val/<class>/*.jpg")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"no images found in {train_dir}: it has no class subdirectories")
    if num_classes not in (0, len(classes)):
        raise DataError(f"num_classes={num_classes} but {train_dir} has {len(classes)} class "
                        f"directories (use num_classes=0 to take the count from the folder)")
    val_classes = set(_class_dirs(val_dir))
    unknown = sorted(val_classes - set(classes))
    if unknown:
        raise DataError(f"{val_dir} has {len(unknown)} class dir(s) not in {train_dir}, "
                        f"e.g. {unknown[0]!r}")
    with ThreadPoolExecutor(_VERIFY_THREADS) as pool:
        train = _scan_split(train_dir, list(enumerate(classes)), verify, log, pool)
        val = _scan_split(val_dir, [(i, c) for i, c in enumerate(classes) if c in val_classes],
                          verify, log, pool)
    if len(set(train[1])) < 2:
        raise DataError(f"{train_dir} holds images of {len(set(train[1]))} class(es): a classifier needs 2 or more "
                        f"(allowed: {train_dir}/<class>/*.jpg with at least two classes)")
    log(f"folder dataset: {len(train[0])} train / {len(val[0])} val images, "
        f"{len(classes)} classes, from {path}")
    return (FolderSource(train_dir, *train, classes, image_size, seed, True, log, layout),
            FolderSource(val_dir, *val, classes, image_size, seed, False, log, layout))


def build_image_sources(dataset: str, path: str | None, image_size: int, num_classes: int,
                        seed: int, synthetic_size: int = 1024, verify: bool = True,
                        log: Log = print, *, layout: str = "chw") -> tuple[ImageSource, ImageSource]:
    """Return (train, val) sources for `dataset` ("synthetic", "shapes" or "folder").

    num_classes=0 means "take it from the dataset" (folder, shapes); synthetic needs it >= 1.
    layout: "chw" (channels first, default) or "hwc" (channels last, for TensorFlow).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    check_layout(layout)
    if image_size < 8:
        raise DataError(f"image_size must be at least 8, got {image_size}")
    if num_classes < 0:
        raise DataError(f"num_classes must be >= 0, got {num_classes}")
    if seed < 0:  # numpy seed sequences take non-negative integers only
        raise DataError(f"seed must be >= 0, got {seed}")
    if dataset == "synthetic":
        if num_classes < 2:
            raise DataError(f"data.num_classes (--num-classes): {num_classes} for dataset 'synthetic' (allowed: 2 "
                            "or more: a classifier of one class learns nothing)")
        if synthetic_size < 1:
            raise DataError(f"synthetic_size must be >= 1, got {synthetic_size}")
        return (SyntheticSource(synthetic_size, num_classes, image_size, seed, True, layout),
                SyntheticSource(max(1, synthetic_size // 8), num_classes, image_size, seed, False,
                                layout))
    if dataset == "shapes":
        if num_classes not in (0, len(SHAPE_CLASSES)):
            raise DataError(f"dataset 'shapes' has {len(SHAPE_CLASSES)} classes, got "
                            f"num_classes={num_classes}")
        return (ShapesSource(SHAPES_TRAIN_SIZE, image_size, seed, True, layout),
                ShapesSource(SHAPES_VAL_SIZE, image_size, seed, False, layout))
    return _build_folder(path, image_size, num_classes, seed, verify, log, layout)
