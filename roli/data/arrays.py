"""In-memory image datasets: uint8 tensors (N, C, H, W) converted to float on the device per batch.

Sources: scikit-learn's digits, .npz files (x uint8 NHWC/NCHW/NHW, y), and CIFAR-10/100 in the
torchvision python-pickle layout (read with a restricted unpickler that only builds numpy arrays).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ArrayData:
    """x: (N, C, H, W) uint8 on the CPU; y: (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    classes: list[str] | None = None
    source_classes: list[str] | None = None  # a class subset's: the whole dataset's names (run fingerprints)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> ArrayData:
        return ArrayData(self.x[idx], self.y[idx], self.num_classes, self.name, self.classes, self.source_classes)

    def to_float(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float in [0, 1] on `device` (for evaluation of small sets)."""
        return to_float(self.x.to(device)), self.y.to(device)

    def batches(self, batch_size: int, shuffle: bool = False, device="cpu", seed: int = 0) -> Epochs:
        """(float images in [0, 1], labels) batches on `device`, for a loop of your own (FileData has the same):
        `for x, y in data.train.batches(64, shuffle=True)`. Each new pass is the next epoch (shuffled anew)."""
        return Epochs(self.loader(batch_size, shuffle=shuffle, device=device, seed=seed))

    # The container interface roli's callers use (FileData has the same): held in memory, not streamed.
    streamed = False

    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of every image."""
        return tuple(self.x.shape[1:])

    def hash_into(self, h) -> None:
        """The whole content (images and labels) into the hashlib object `h` (the feature cache's key)."""
        from roli._io import hash_tensors

        hash_tensors(h, [self.x, self.y])

    def content_digest(self, mode: str = "full") -> str:
        """The sha256 of every image (in memory: always whole, whatever the mode; the labels are their own part)."""
        import hashlib

        from roli._io import hash_tensors

        h = hashlib.sha256()
        hash_tensors(h, [self.x])
        return h.hexdigest()

    def sample_parts(self) -> dict[str, tuple]:
        """What a run's fingerprint hashes: the labels, and the image size with 64 images spread over the set."""
        idx = torch.linspace(0, max(0, len(self) - 1), min(64, len(self))).long()
        return {"labels": (self.y,), "pixels": (list(self.x.shape[1:]), self.x[idx])}

    def select_classes(self, classes: list[int]) -> ArrayData:
        """The examples of `classes`, relabelled 0..k-1 in that order, with those classes' names."""
        table = relabel_table(self.num_classes, classes)
        sub = self.subset(torch.nonzero(table[self.y] >= 0)[:, 0])
        sub.y, sub.num_classes = table[sub.y], len(classes)
        if self.classes is not None:
            sub.classes, sub.source_classes = [self.classes[c] for c in classes], self.classes
        return sub

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        device="cpu",
        seed: int = 0,
        workers: int = 0,
        drop_last: bool = False,
        indices: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        """Batches on `device` (`workers` is ignored: the images are in memory); under torchrun (`world` > 1)
        this rank's share of each shuffled epoch."""
        return ArrayLoader(self, batch_size, shuffle, device, seed, drop_last, indices, rank, world)


def relabel_table(num_classes: int, classes: list[int]) -> torch.Tensor:
    """label -> its index in `classes`, -1 for a label not kept."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[torch.tensor(classes)] = torch.arange(len(classes))
    return table


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255)


class Epochs:
    """A loader whose every pass is the next epoch (set_epoch before each), so a plain `for epoch ...: for x, y in
    batches` reshuffles; roli's own epoch loop sets the epoch itself."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        yield from self.loader


class ArrayLoader:
    """Batches of (float images in [0, 1] on `device`, labels on `device`); the uint8 -> float conversion
    happens on the device. Each epoch reshuffles with (seed, epoch), so runs are reproducible."""

    def __init__(self, data: ArrayData, batch_size, shuffle, device, seed, drop_last, indices, rank=0, world=1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.rank, self.world = rank, world
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.device, self.seed, self.drop_last, self.epoch = torch.device(device), seed, drop_last, 0
        self.indices = indices if indices is not None else torch.arange(len(data))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = -(-len(self.indices) // self.world)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor:
        idx = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = idx[torch.randperm(len(idx), generator=g)]
        if self.world > 1:  # like DistributedSampler: pad to a multiple of world, then every world-th sample
            pad = (-len(idx)) % self.world
            idx = torch.cat([idx, idx[:pad]])[self.rank :: self.world]
        return idx

    def __iter__(self):
        idx = self._order()
        pinned = self.device.type == "cuda"
        for i in range(len(self)):
            b = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x = gather(self.data.x, b, pinned).to(self.device, non_blocking=True)
            yield to_float(x), gather(self.data.y, b, pinned).to(self.device, non_blocking=True)


def gather(t: torch.Tensor, rows: torch.Tensor, pinned: bool) -> torch.Tensor:
    """t[rows], written straight into page-locked memory when `pinned` (a GPU run): the copy to the device is then
    truly asynchronous. From pageable memory a non_blocking copy still makes the host wait until the GPU has
    finished the work queued before it, so the next step's launches would only start once the GPU is idle.
    The pinned block comes from torch's caching host allocator, which reuses it only after its copy is done."""
    if not pinned:
        return t[rows]
    out = torch.empty((len(rows), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, rows, out=out)


def _labels(y, source: str, num_classes: int | None = None) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be a 1-D integer array; got {y.dtype} with shape {y.shape}")
    bad = np.nonzero((y < 0) | ((y >= num_classes) if num_classes else False))[0]
    if len(bad):
        raise ValueError(f"{source}: labels out of range at indices {bad[:5].tolist()} (values {y[bad[:5]].tolist()})")
    return torch.from_numpy(y.astype(np.int64))


def to_nchw_uint8(x: np.ndarray, source: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{source}: images must have 3 or 4 dimensions (N,H,W / NHWC / NCHW); got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        alpha = " (RGBA? drop the alpha channel)" if x.shape[1] == 4 else ""
        raise ValueError(
            f"{source}: images must have 1 (grey) or 3 (RGB) channels; got shape {x.shape} read as "
            f"{x.shape[1]} channels{alpha}"
        )
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.size and not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0].tolist()
            raise ValueError(f"{source}: images hold non-finite pixels (NaN/inf), e.g. at index {bad}")
        if not np.issubdtype(x.dtype, np.floating) or x.size and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{source}: images must be uint8, or floats in [0, 1]; got {x.dtype}")
        x = np.rint(x * 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(x))


def digits() -> tuple[ArrayData, ArrayData]:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes) as (train, test): a fixed 80/20 split, seed 0."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = to_nchw_uint8((d.images / 16.0).astype(np.float32), "digits")
    y = _labels(d.target, "digits")
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    cut = int(0.8 * len(y))
    full = ArrayData(x, y, 10, "digits", [str(i) for i in range(10)])
    return full.subset(order[:cut]), full.subset(order[cut:])


def npz(path: str | Path) -> tuple[ArrayData | None, ArrayData | None]:
    """(train, test) from an npz with x_train/y_train and/or x_test/y_test, or (all, None) from x/y."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"npz file not found: {path}")
    try:
        return _npz(path)
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as e:  # empty, cut short
        raise ValueError(
            f"cannot read {path} as an npz file ({type(e).__name__}: {e}); write it with numpy.savez"
        ) from None


def _npz(path: Path) -> tuple[ArrayData | None, ArrayData | None]:
    try:
        f = np.load(path, allow_pickle=False)
    except ValueError:  # neither a zip nor a .npy: numpy reads it as a pickle, refuses, and advises allow_pickle
        raise ValueError(
            f"cannot read {path} as an npz file (it is not a zip of arrays); write it with numpy.savez"
        ) from None
    if not isinstance(f, np.lib.npyio.NpzFile):  # a single array (numpy.save's .npy): no labels in it
        raise ValueError(
            f"{path} holds one array of shape {f.shape}, not arrays x_train/y_train and/or x_test/y_test (or x/y); "
            "write them with numpy.savez"
        )
    with f:
        keys = set(f.keys())
        pairs = [(f"x_{s}", f"y_{s}") for s in ("train", "test")] if {"x_train", "x_test"} & keys else [("x", "y")]
        if not any(set(p) <= keys for p in pairs):
            raise ValueError(
                f"{path}: expected arrays x_train/y_train and/or x_test/y_test, or x/y; found {sorted(keys)}"
            )
        ys = {p: np.asarray(f[p[1]]).reshape(-1) for p in pairs if set(p) <= keys}
        for y in ys.values():
            _labels(y, str(path))  # integer labels >= 0, before their maximum is taken
        k = max(int(y.max()) for y in ys.values() if y.size) + 1 if any(y.size for y in ys.values()) else 0
        out = [
            _check_sizes(ArrayData(to_nchw_uint8(f[p[0]], str(path)), _labels(ys[p], str(path)), k, path.stem))
            if p in ys
            else None
            for p in pairs
        ]
    return (out[0], out[1]) if len(out) == 2 else (out[0], None)


def _check_sizes(d: ArrayData) -> ArrayData:
    if len(d.x) != len(d.y):
        raise ValueError(f"{d.name}: {len(d.x)} images but {len(d.y)} labels")
    return d


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's pickles hold dicts of bytes, lists and numpy arrays: allow exactly what builds those."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}  # fmt: skip

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"CIFAR file not found: {path}")
    with path.open("rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"cannot read CIFAR pickle {path}: {e}") from None


def tfds_order(split: str, n: int) -> torch.Tensor:
    """The record order of TensorFlow Datasets' CIFAR builders, as index tensor into the files' order: TFDS keys
    example i of a split by the integer i (image_classification/cifar.py) and writes the split sorted by
    md5(split name + str(key)) as a 128-bit integer (core/hashing.py's Hasher, salted with the split name;
    core/shuffle.py sorts ascending and keeps that order across shards). The RoLI reference reads CIFAR through
    TFDS (cifar10:3.*.*, train[:45000] / train[45000:], test in this order). Checked against TFDS 4.9.10's own
    Hasher on all 50,000 train and 10,000 test keys (tests/test_data.py holds its first keys)."""
    salt = split.encode()
    keys = [int(hashlib.md5(salt + str(i).encode()).hexdigest(), 16) for i in range(n)]
    return torch.tensor(sorted(range(n), key=keys.__getitem__), dtype=torch.long)


def cifar(root: str | Path, which: str = "cifar10") -> tuple[ArrayData, ArrayData]:
    """(train, test) of CIFAR-10 or CIFAR-100 from the torchvision layout (root or root/cifar-10-batches-py)."""
    root = Path(root).expanduser()
    sub, files, label_key = {
        "cifar10": ("cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]), b"labels"),
        "cifar100": ("cifar-100-python", (["train"], ["test"]), b"fine_labels"),
    }[which]
    base = root / sub if (root / sub).is_dir() else root
    k = 10 if which == "cifar10" else 100
    out = []
    for names in files:
        parts = [_unpickle(base / n) for n in names]
        for n, p in zip(names, parts, strict=True):
            if not isinstance(p, dict) or b"data" not in p or label_key not in p:
                raise ValueError(f"CIFAR pickle {base / n} lacks {b'data'!r} or {label_key!r}: not a {which} batch")
            if (
                len(p[b"data"]) != len(p[label_key])
                or np.asarray(p[b"data"]).ndim != 2
                or np.asarray(p[b"data"]).shape[1] != 3072
            ):
                raise ValueError(
                    f"CIFAR pickle {base / n}: {len(p[b'data'])} images of shape "
                    f"{np.asarray(p[b'data']).shape[1:]} and {len(p[label_key])} labels; expected equal "
                    "counts of 3072 bytes each"
                )
        x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[label_key]) for p in parts])
        out.append(
            ArrayData(torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), _labels(y, str(base), k), k, which)
        )
    return out[0], out[1]
