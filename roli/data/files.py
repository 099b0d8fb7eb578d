"""Image-file datasets: ImageFolder trees and JSON split files ({relative_path: label} + an image root,
the format the RoLI reference uses for Caltech256, CUB-200-2011 and Stanford Dogs).

Images are decoded with PIL into uint8 (C, H, W) tensors in DataLoader workers, transformed there
(roli.data.transforms), batched as uint8 in pinned memory and converted to float on the device.
Missing files are reported at construction (first few named); an unreadable image raises an error
naming it when decoded, and verify() scans all of them and names the first few.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from roli.data.arrays import to_float

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def _decode(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise ValueError(f"unreadable image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8


PARALLEL_FROM = 2000  # files: fewer are read and checked in this process


def _check_file(path: str) -> tuple[str, str | None]:
    data = Path(path).read_bytes()
    return hashlib.sha256(data).hexdigest(), _not_an_image(data)


def _checked(paths: list[str], workers: int | None = None):
    """(sha256, why it is no image or None) of each file, in order; large sets in a pool of forked processes
    (they only read, hash and decode with PIL: no torch)."""
    import multiprocessing

    workers = workers or os.cpu_count() or 1
    if len(paths) < PARALLEL_FROM or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return map(_check_file, paths)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_check_file, paths, chunksize=64)


def _not_an_image(data: bytes) -> str | None:
    """Why these bytes are no image PIL can read (empty, text, a corrupt header, chunk or pixel data, a
    decompression bomb: more pixels than PIL's limit), or None. verify() checks the structure (PNG's CRCs), then
    the pixels are decoded (a JPEG at 1/8 scale through PIL's draft mode: every byte of its data is still read,
    so a file cut short is found, at a fraction of a full decode's time)."""
    import io
    import warnings

    from PIL import Image

    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)).strip().splitlines()  # no address
        return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__
    return None


class FileData(Dataset):
    """(path, label) pairs; __getitem__ returns (uint8 (3, H, W) after `transform`, label)."""

    def __init__(self, items: list[tuple[Path, int]], num_classes: int, name: str, classes=None, transform=None):
        missing = [str(p) for p, _ in items if not p.is_file()]
        if missing:
            raise ValueError(f"{name}: {len(missing)} image files are missing, e.g. {', '.join(missing[:3])}")
        bad = [(str(p), y) for p, y in items if not 0 <= y < num_classes]
        if bad:
            raise ValueError(f"{name}: labels out of range [0, {num_classes}): {bad[:3]}")
        self.items, self.num_classes, self.name, self.classes = items, num_classes, name, classes
        self.transform = transform
        self.y = torch.tensor([y for _, y in items], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        img = _decode(path)
        return (self.transform(img) if self.transform else img), label

    def subset(self, idx: torch.Tensor) -> FileData:
        return FileData([self.items[int(i)] for i in idx], self.num_classes, self.name, self.classes, self.transform)

    def with_transform(self, transform) -> FileData:
        return FileData(self.items, self.num_classes, self.name, self.classes, transform)

    def verify(self, limit: int = 5) -> None:
        """Decode every image; raise naming the first `limit` unreadable ones."""
        bad = []
        for path, _ in self.items:
            try:
                _decode(path)
            except ValueError as e:
                bad.append(str(e))
                if len(bad) >= limit:
                    break
        if bad:
            raise ValueError(f"{self.name}: unreadable images: {'; '.join(bad)}")

    def batches(self, batch_size: int, shuffle: bool = False, device="cpu", seed: int = 0, workers: int = 0):
        """(float images in [0, 1], labels) batches on `device`, decoded and transformed by `workers` processes
        (0: in this one), for a loop of your own (ArrayData has the same). Each new pass is the next epoch."""
        from roli.data.arrays import Epochs

        return Epochs(self.loader(batch_size, shuffle=shuffle, device=device, seed=seed, workers=workers))

    def to_float(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """All images decoded and transformed, as float in [0, 1] on `device` (small sets only: it holds them all;
        batches() streams)."""
        x, y = zip(*(self[i] for i in range(len(self))), strict=True)
        return to_float(torch.stack(x).to(device)), torch.tensor(y, dtype=torch.int64, device=device)

    # The container interface roli's callers use (ArrayData has the same): decoded while loading.
    streamed = True

    def image_shape(self) -> tuple[int, ...] | None:
        """(3, crop, crop) after a crop transform; None when the files' own sizes decide."""
        crop_size = getattr(self.transform, "crop_size", None)
        return (3, crop_size, crop_size) if crop_size else None

    def hash_into(self, h) -> None:
        """Paths, file sizes, mtimes and labels into the hashlib object `h` (the feature cache's key)."""
        for path, label in self.items:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())

    def content_digest(self, mode: str = "full", workers: int | None = None) -> str:
        """The sha256 of every file's path and bytes (streamed), or (mode "stat") of their paths, sizes and mtimes
        (with the labels): a copied or touched folder keeps its "full" digest, not its "stat" one. "full" also
        checks that each file is an image (_not_an_image), in `workers` processes for large sets (default: every
        CPU). Raises ValueError naming the first unreadable files."""

        h = hashlib.sha256()
        if mode == "stat":
            self.hash_into(h)
            return h.hexdigest()
        paths = [str(p) for p, _ in self.items]
        bad = []
        for path, (digest, why) in zip(paths, _checked(paths, workers), strict=True):
            h.update(f"{path}\0{digest}\n".encode())
            if why is not None and len(bad) < 5:
                bad.append(f"{path} ({why})")
        if bad:
            raise ValueError(f"{self.name}: unreadable image(s): {'; '.join(bad)}")
        return h.hexdigest()

    def sample_parts(self) -> dict[str, tuple]:
        """What a run's fingerprint hashes: the labels, and the file list with the files' sizes."""
        items = [(str(p), int(y)) for p, y in self.items]
        sizes = [os.stat(p).st_size if os.path.exists(p) else -1 for p, _ in items]
        return {"labels": ([y for _, y in items],), "files": ([p for p, _ in items], sizes)}

    def select_classes(self, classes: list[int]) -> FileData:
        """The examples of `classes`, relabelled 0..k-1 in that order (class names kept for those)."""
        from roli.data.arrays import relabel_table

        table = relabel_table(self.num_classes, classes)
        names = [self.classes[c] for c in classes] if self.classes is not None else None
        kept = [(p, int(table[y])) for p, y in self.items if table[y] >= 0]
        return FileData(kept, len(classes), self.name, names, self.transform)

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        device="cpu",
        seed: int = 0,
        workers: int = 2,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        """Batches decoded by `workers` processes onto `device`; under torchrun (`world` > 1) this rank's share
        of each shuffled epoch (a DistributedSampler)."""
        sampler = None
        if world > 1:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(self, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        return FileLoader(self, batch_size, shuffle, device, seed, workers, drop_last, sampler)


class FileLoader:
    """DataLoader with workers and pinned memory; yields (float images in [0, 1] on device, labels)."""

    def __init__(self, data, batch_size, shuffle, device, seed, workers, drop_last, sampler):
        self.device, self.seed = torch.device(device), seed
        g = torch.Generator().manual_seed(seed)
        self.dl = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            generator=g,
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        return len(self.dl)

    def set_epoch(self, epoch: int) -> None:
        """Shuffling and random transforms become a function of (seed, epoch): resumable runs."""
        self.dl.generator.manual_seed(self.seed * 100_003 + epoch)
        if hasattr(self.dl.sampler, "set_epoch"):
            self.dl.sampler.set_epoch(epoch)

    def __iter__(self):
        for x, y in self.dl:
            yield to_float(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)


def image_folder(root: str | Path, classes: list[str] | None = None) -> FileData:
    """root/<class>/<image>; classes sorted by name, or given (the train split's: then a class folder that
    train does not have is an error naming it)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes is not None:
        unknown = [c for c in found if c not in set(classes)]
        if unknown:
            raise ValueError(f"{root}: class folders that the train split does not have: {', '.join(unknown[:5])}")
    classes = classes or found
    if not classes:
        raise ValueError(f"{root}: no class sub-folders")
    index = {c: i for i, c in enumerate(classes)}
    items = [
        (p, index[d.name])
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name in index
        for p in sorted(d.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise ValueError(f"{root}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return FileData(items, len(classes), root.name, classes)


def _label_key(label) -> str | None:
    """A split file's label as a class name: an integer >= 0 or a non-empty string (CUB writes "001")."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return str(label) if label >= 0 else None
    if isinstance(label, str) and label.strip():
        return label
    return None


def label_order(labels) -> list[str]:
    """The distinct labels in class order: numeric order where every label is a number (Stanford Dogs'
    1..120 -> classes 0..119, CUB's "001".."200" -> 0..199), else sorted as text."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=lambda v: (int(v), v))
    except ValueError:
        return sorted(distinct)


def json_split(split_file: str | Path, image_root: str | Path, classes: list[str] | None = None) -> FileData:
    """{relative_path: label} from `split_file`, images under `image_root`, as the RoLI reference ships
    them (integer or string labels). Without `classes` (the train split) the class order is built from the
    file's labels (label_order); with it (val/test: the train split's), a label that train lacks is an
    error naming it. The FileData's `classes` are the original labels, in class order."""
    split_file, image_root = Path(split_file).expanduser(), Path(image_root).expanduser()
    if not split_file.is_file():
        raise ValueError(f"JSON split file not found: {split_file}")
    if not image_root.is_dir():
        raise ValueError(f"image root not found: {image_root}")
    try:
        mapping = json.loads(split_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{split_file} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{split_file} is not a text (JSON) file") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{split_file} must hold a non-empty object {{relative_path: label}}")
    outside = [p for p in mapping if Path(p).is_absolute() or ".." in Path(p).parts]
    if outside:
        raise ValueError(
            f"{split_file}: paths must stay inside the image root (relative, no '..'); got e.g. {outside[:3]}"
        )
    keys = {p: _label_key(v) for p, v in mapping.items()}
    bad = [(p, mapping[p]) for p, k in keys.items() if k is None]
    if bad:
        raise ValueError(f"{split_file}: labels must be integers >= 0 or class names; got e.g. {bad[:3]}")
    if classes is None:
        classes = label_order(keys.values())
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({k for k in keys.values() if k not in index})
    if unknown:
        example = next(p for p, k in keys.items() if k == unknown[0])
        more = f"; {len(unknown)} such labels" if len(unknown) > 1 else ""
        raise ValueError(
            f"{split_file}: label {unknown[0]!r} (e.g. {example}) is not among the train split's "
            f"{len(classes)} classes{more}"
        )
    return FileData([(image_root / p, index[k]) for p, k in keys.items()], len(classes), split_file.stem, list(classes))
