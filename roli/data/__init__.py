"""Datasets: load_dataset(name, ...) -> train / val / test splits for the RoLI protocol.

names: "digits" (scikit-learn), "npz:PATH", "cifar10:ROOT", "cifar100:ROOT" (torchvision pickle layout),
"imagefolder:ROOT" (ROOT/train, ROOT/test[, ROOT/val], each ROOT/<split>/<class>/<image>), and
"json:DIR" (DIR/train.json, DIR/test.json[, DIR/val.json] mapping relative paths to labels, integer or
string, as the RoLI reference's data_splits ship them; images under DIR or `image_root`). The class order
is built from the train split (numeric order where every label is a number); a val/test label or class
folder that train lacks is an error naming it.

Validation: the format's own val split when it has one; for CIFAR without split_seed the last
`val_percent` % of train (train[:45000] / train[45000:]: with record_order="tfds" in TensorFlow Datasets'
record order, the reference's images; with "file", the default, in the pickles' order); otherwise a seeded
split stratified by class (split_seed, default 0), so a file sorted by class never loses whole classes
to validation. A validation or test label that train lacks is an error. Arrays stay uint8 in memory;
file datasets get the reference transforms (train: Resize(256)+RandomCrop(224)+flip; eval:
Resize(256)+CenterCrop(224)), configurable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from roli.data import arrays, files
from roli.data.arrays import ArrayData, ArrayLoader, to_float
from roli.data.files import FileData, FileLoader
from roli.data.transforms import ProtocolTransform

KINDS = ("digits", "npz", "cifar10", "cifar100", "imagefolder", "json")


@dataclass
class Splits:
    train: ArrayData | FileData | None  # None only for a test-only npz
    val: ArrayData | FileData | None
    test: ArrayData | FileData | None
    num_classes: int
    name: str
    val_split: str = ""  # how the validation split was made (recorded in the run's config.json)

    @property
    def in_chans(self) -> int:
        """The images' channels (image files are decoded to RGB): create_classifier(..., in_chans=data.in_chans)."""
        some = next(d for d in (self.train, self.val, self.test) if d is not None)
        shape = some.image_shape()
        return int(shape[0]) if shape else 3


def _split_val(train, val_percent: float, split_seed: int | None, tail: bool):
    """(train, val): the tail `val_percent` % (tail=True: the reference protocol for CIFAR's own order),
    else a seeded split stratified by class (every class in proportion, each keeps an example in train)."""
    if not 0 < val_percent < 100:
        raise ValueError(f"val_percent must be in (0, 100); got {val_percent}")
    n = len(train)
    n_val = max(1, round(n * val_percent / 100))
    if n_val >= n:
        raise ValueError(f"{n} training examples are too few for a {val_percent}% validation split")
    if tail:
        order = torch.arange(n)
        return train.subset(order[: n - n_val]), train.subset(order[n - n_val :])
    seed = 0 if split_seed is None else split_seed
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    y = train.y[perm]
    val_parts = []
    for c in torch.unique(y):
        members = perm[y == c]
        k = min(round(len(members) * val_percent / 100), len(members) - 1)
        val_parts.append(members[:k])
    val_idx = torch.cat(val_parts) if val_parts else torch.zeros(0, dtype=torch.long)
    if val_idx.numel() == 0:
        raise ValueError(
            f"{n} training examples are too few for a stratified {val_percent}% validation split "
            "(no class has enough examples)"
        )
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_idx] = False
    return train.subset(torch.nonzero(keep)[:, 0]), train.subset(torch.sort(val_idx).values)


def _check_labels_within_train(train, others: dict) -> None:
    """A validation or test label that the train split never has is an error naming it."""
    known = set(torch.unique(train.y).tolist())
    for name, split in others.items():
        if split is None or len(split) == 0:
            continue
        unknown = sorted(set(torch.unique(split.y).tolist()) - known)
        if unknown:
            raise ValueError(
                f"the {name} split has labels the train split lacks: {unknown[:5]}"
                + (f" ({len(unknown)} in all)" if len(unknown) > 5 else "")
            )


def load_dataset(
    name: str,
    val_percent: float = 10.0,
    split_seed: int | None = None,
    image_root: str | Path | None = None,
    resize: int = 256,
    crop_size: int = 224,
    train_augment: bool = True,
    interpolation: str = "bilinear",
    record_order: str = "file",
) -> Splits:
    """Load `name` (see the module docstring) as train/val/test splits. record_order: "file" or "tfds"
    (CIFAR only: train and test in TensorFlow Datasets' record order, arrays.tfds_order)."""
    kind, _, arg = name.partition(":")
    if record_order not in ("file", "tfds"):
        raise ValueError(f"record_order must be file or tfds; got {record_order!r}")
    if record_order == "tfds" and kind not in ("cifar10", "cifar100"):
        raise ValueError(
            f"record_order tfds (TensorFlow Datasets' order) applies to cifar10: and cifar100:, not {kind}"
        )
    if kind not in KINDS:
        raise ValueError(
            f"unknown dataset {name!r}; use one of digits, npz:PATH, cifar10:ROOT, cifar100:ROOT, "
            "imagefolder:ROOT, json:DIR"
        )
    if kind != "digits" and not arg:
        raise ValueError(f"dataset {kind!r} needs a path: {kind}:PATH")
    val = None
    if kind == "digits":
        train, test = arrays.digits()
    elif kind == "npz":
        train, test = arrays.npz(arg)
    elif kind in ("cifar10", "cifar100"):
        train, test = arrays.cifar(arg, kind)
        if record_order == "tfds":
            train, test = (
                d.subset(arrays.tfds_order(split, len(d))) for split, d in (("train", train), ("test", test))
            )
    elif kind == "imagefolder":
        root = Path(arg).expanduser()
        train = files.image_folder(root / "train")
        test = files.image_folder(root / "test", train.classes) if (root / "test").is_dir() else None
        val = files.image_folder(root / "val", train.classes) if (root / "val").is_dir() else None
    else:
        d = Path(arg).expanduser()
        img_root = Path(image_root).expanduser() if image_root else d
        train = files.json_split(d / "train.json", img_root)  # the class order comes from train's labels
        test = files.json_split(d / "test.json", img_root, train.classes) if (d / "test.json").is_file() else None
        val = files.json_split(d / "val.json", img_root, train.classes) if (d / "val.json").is_file() else None
    if train is None and test is None:
        raise ValueError(f"{name} holds no images")
    val_split = "the dataset's own"
    if val is None and train is not None:
        tail = kind in ("cifar10", "cifar100") and split_seed is None
        train, val = _split_val(train, val_percent, split_seed, tail)
        order = "TensorFlow Datasets' record order, the reference's" if record_order == "tfds" else "the files' order"
        val_split = (
            f"the last {val_percent:g}% of train in {order} (the reference CIFAR protocol's split)"
            if tail
            else f"{val_percent:g}% of train, stratified by class, seed {split_seed or 0}"
        )
    if train is not None and kind == "npz":  # the other formats declare their classes (CIFAR, folders, splits)
        _check_labels_within_train(train, {"validation": val, "test": test})
    num_classes = max(s.num_classes for s in (train, val, test) if s is not None)
    if isinstance(train, FileData):  # file datasets always have a train split
        evaluation = ProtocolTransform(False, resize, crop_size, interpolation)
        train = train.with_transform(ProtocolTransform(train_augment, resize, crop_size, interpolation))
        val = val.with_transform(evaluation)
        test = test.with_transform(evaluation) if test is not None else None
    return Splits(train, val, test, num_classes, name, val_split)


__all__ = [
    "ArrayData",
    "ArrayLoader",
    "FileData",
    "FileLoader",
    "ProtocolTransform",
    "Splits",
    "load_dataset",
    "to_float",
]
