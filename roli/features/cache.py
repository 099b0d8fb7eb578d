"""Frozen-backbone features computed once, stored on disk, reused across runs.

Only clean, deterministic views can be cached: features of images under random training
augmentation (random crops, flips) differ every epoch, and input-space PGD (ALP) must go through the
backbone at every step, so adversarial features are never cached. Cached clean features serve clean
linear probing (the LP baseline, LP-FT initialisation, LR/WD sweeps that train many heads from one
pass) and clean validation of probes.

An entry lives in <root>/<key>/ (features.npy memory-mappable, labels.npy, meta.json). The key is a
hash of everything that changes the features: backbone name and the content of its weights,
preprocessing (resize, mean/std, the deterministic transform), dataset identity (array content, or
file paths, sizes and labels), split, dtype and roli version. An entry is written into a temporary
folder and renamed into place only when complete, so a run killed while writing leaves nothing that
reads as valid. meta.json records the sha256 of both arrays' files: an entry whose files were cut short or
replaced since (a full disk, a copy, an edit), or whose meta.json describes another key (a folder copied or renamed),
is computed again, with a warning, never read. Under torchrun each
rank computes its shard; rank 0 assembles the entry once.

What a killed writer leaves (its ".tmp-<key>..." folder, a ".removing-<key>-..." folder whose removal was cut short)
is removed by the next miss (sweep): a writer holds a shared flock on ".lock" in its folder for as long as it writes,
so a folder whose lock can be taken is nobody's. Only folders of those names that hold nothing but the files roli
writes there are removed.

Root: $ROLI_CACHE_DIR/features, else ~/.cache/roli/features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import roli
from roli import _env
from roli._amp import autocast_for
from roli._dist import rank_world
from roli._io import file_sha256, hash_tensors, lock_file, nearest_existing

DTYPES = ("fp32", "bf16")
FILES = ("features.npy", "labels.npy")
LOCK = ".lock"  # in a folder being written: a shared flock held by each writer (every rank under torchrun)
LEFTOVER = re.compile(r"\.(?:tmp|removing)-[0-9a-f]{32}(?:-[0-9a-f]{8})?")  # the folders a killed writer leaves
WRITTEN = re.compile(r"features\.npy|labels\.npy|meta\.json|shard\d+\.pt|\.lock")  # what roli writes in them
QUIET_FOR = 60.0  # seconds: a folder without a lock (an earlier roli's, or being removed) this long untouched is stale
log = logging.getLogger("roli.features")


def default_root() -> Path:
    return _env.cache_root() / "features"


def check_root(root: str | Path | None = None) -> None:
    """ValueError naming the path when the cache's root cannot be a folder (it, or a folder above it, is a file):
    checked before a run writes anything."""
    path = Path(root) if root is not None else default_root()
    base = nearest_existing(path)
    if not base.is_dir():
        raise ValueError(
            f"roli's cache folder {path} lies under {base}, which is a file: point ROLI_CACHE_DIR at a folder"
        )


@dataclass
class Features:
    """x: (N, D) float32 (memory-mapped from the cache when loaded); y: (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    key: str
    hit: bool


def dataset_identity(data) -> str:
    h = hashlib.sha256()
    data.hash_into(h)
    return h.hexdigest()


def cache_key(model, data, split: str, dtype: str) -> tuple[str, dict]:
    """(hex key, the human-readable description hashed into it)."""
    transform = getattr(data, "transform", None)
    if transform is not None and getattr(transform, "train", False):
        raise ValueError(
            f"cannot cache features of {data.name!r}: it uses random training augmentation ({transform!r}); "
            "cache a deterministic view (an eval transform) instead"
        )
    wh = hashlib.sha256()
    hash_tensors(wh, model.backbone.state_dict().values())
    pre = model.pre
    desc = {
        "backbone": model.name,
        "weights_sha256": wh.hexdigest(),
        "mean": None if pre.mean is None else pre.mean.flatten().tolist(),
        "std": None if pre.std is None else pre.std.flatten().tolist(),
        "input_size": list(pre.input_size) if pre.input_size else None,
        "transform": repr(transform) if transform is not None else None,
        "dataset": dataset_identity(data),
        "split": split,
        "dtype": dtype,
        "roli": roli.__version__,
    }
    return key_of(desc), desc


def key_of(desc: dict) -> str:
    """The key of an entry's description (meta.json holds it, with n, dim and sha256 beside it)."""
    desc = {k: v for k, v in desc.items() if k not in ("n", "dim", "sha256")}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def _batches(data, batch_size: int, device, indices):
    workers = min(4, os.cpu_count() or 1) if data.streamed else 0
    for x, y in data.subset(indices).loader(batch_size, device=device, workers=workers):
        yield x, y.cpu()


@torch.no_grad()
def compute_features(
    model, data, batch_size: int = 256, dtype: str = "fp32", device="cpu", indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels of `data` (or its rows `indices`), backbone in eval mode."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    device = torch.device(device)
    indices = torch.arange(len(data)) if indices is None else indices
    was_training = model.training
    model.eval()
    try:
        feats, labels = [], []
        for x, y in _batches(data, batch_size, device, indices):
            with autocast_for(device, "bf16" if dtype == "bf16" else "fp32"):
                feats.append(model.features(x).float().cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, model.feat_dim), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def path(self, key: str) -> Path:
        return self.root / key

    def valid(self, key: str) -> bool:
        return (self.path(key) / "meta.json").is_file()

    def invalidate(self, key: str) -> None:
        """The entry `key` (roli's own folder) renamed out of the way, then removed: a reader never sees it half
        deleted, and a new entry can take its place at once."""
        aside = self.root / f".removing-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path(key), aside)
        except OSError:  # absent, or another process set it aside (or replaced it) first
            return
        shutil.rmtree(aside, ignore_errors=True)

    def sweep(self, keep: str | None = None) -> list[Path]:
        """Remove the folders killed writers left in the root (see the module docstring), except `keep` (a name this
        process is about to write in). Returns what was removed."""
        removed = []
        for d in sorted(self.root.glob(".*-*")) if self.root.is_dir() else []:
            if d.name == keep or not LEFTOVER.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
                continue
            try:
                names = os.listdir(d)
                if not all(WRITTEN.fullmatch(n) and (d / n).is_file() and not (d / n).is_symlink() for n in names):
                    continue  # something roli does not write there: not touched
                if LOCK in names:
                    fd = lock_file(d / LOCK, wait=False)
                    if fd is None:
                        continue  # a writer is at work
                    os.close(fd)
                elif time.time() - d.stat().st_mtime < QUIET_FOR:
                    continue  # just created (its writer takes its lock next), or another process removing it
                for n in names:
                    (d / n).unlink(missing_ok=True)
                d.rmdir()
            except (OSError, ValueError):  # gone meanwhile, or a file appeared: left for a later sweep
                continue
            log.info("feature cache: removed %s, left by a writer that did not finish", d)
            removed.append(d)
        return removed

    def load(self, key: str) -> Features:
        """The entry `key` as written: ValueError naming what is wrong when its files are not the ones recorded."""
        d = self.path(key)
        try:
            meta = json.loads((d / "meta.json").read_text())
            if key_of(meta) != key:
                raise ValueError("its meta.json describes another entry (copied or renamed?)")
            recorded = meta.get("sha256", {})  # an entry of an earlier roli has none: its shapes are checked
            for name in FILES:
                if name in recorded and file_sha256(d / name) != recorded[name]:
                    raise ValueError(f"{name} is not the file written there (its sha256 differs)")
            x = torch.from_numpy(np.load(d / "features.npy", mmap_mode="c"))  # copy-on-write: the file stays as is
            y = torch.from_numpy(np.load(d / "labels.npy"))
        except (OSError, ValueError, AttributeError, TypeError) as e:  # cut short, not JSON, not an array
            raise ValueError(f"feature cache entry {d} is damaged ({e})") from None
        if tuple(x.shape) != (meta.get("n"), meta.get("dim")) or y.shape != (meta.get("n"),):
            raise ValueError(f"feature cache entry {d} is damaged (arrays of {tuple(x.shape)} and {tuple(y.shape)})")
        return Features(x, y, key, hit=True)

    def get(self, model, data, split: str, dtype: str = "fp32", batch_size: int = 256, device="cpu") -> Features:
        """The cached features of (model, data, split, dtype), computed and stored on a miss (and in place of a
        damaged entry)."""
        key, desc = cache_key(model, data, split, dtype)
        rank, world = rank_world()
        if self.valid(key):
            try:
                return self.load(key)
            except ValueError as e:
                if world > 1:
                    dist.barrier()  # every rank has read the entry (and found it damaged) before rank 0 moves it
                if rank == 0:
                    log.warning("%s: computing the features again", e)
                    self.invalidate(key)
        tmp = self.root / f".tmp-{key}"
        if world == 1:
            tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        if rank == 0:
            self.sweep(keep=tmp.name)
        tmp.mkdir(parents=True, exist_ok=True)
        fd = lock_file(tmp / LOCK, shared=True)  # held while this process writes: no sweep removes the folder
        try:
            x, y = self._write(key, desc, tmp, model, data, (batch_size, dtype, device))
        except BaseException:
            if world == 1:
                shutil.rmtree(tmp, ignore_errors=True)  # an error or ^C: nothing left behind
            raise
        finally:
            os.close(fd)
        if rank:
            loaded = self.load(key)
            return Features(loaded.x, loaded.y, key, hit=False)
        return Features(x, y, key, hit=False)

    def _write(self, key, desc, tmp: Path, model, data, how) -> tuple[torch.Tensor, torch.Tensor]:
        rank, world = rank_world()
        shard = torch.arange(len(data)).tensor_split(world)[rank]
        x, y = compute_features(model, data, *how, shard)
        if world > 1:
            torch.save({"x": x, "y": y}, tmp / f"shard{rank}.pt")
            dist.barrier()
        if rank == 0:
            if world > 1:
                parts = [torch.load(tmp / f"shard{r}.pt", weights_only=True) for r in range(world)]
                x, y = torch.cat([p["x"] for p in parts]), torch.cat([p["y"] for p in parts])
            self._commit(key, desc, tmp, x, y)
        if world > 1:
            dist.barrier()
        return x, y

    def _commit(self, key, desc, tmp: Path, x: torch.Tensor, y: torch.Tensor) -> None:
        out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32, shape=tuple(x.shape))
        out[:] = x.numpy()
        out.flush()
        del out
        np.save(tmp / "labels.npy", y.numpy())
        sha = {name: file_sha256(tmp / name) for name in FILES}
        meta = {**desc, "n": len(y), "dim": int(x.shape[1]), "sha256": sha}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in [*tmp.glob("shard*.pt"), tmp / LOCK]:
            f.unlink(missing_ok=True)  # the lock too (the writers' descriptors still hold it): not part of the entry
        final = self.path(key)
        try:
            os.rename(tmp, final)  # atomic: the entry appears complete or not at all
        except OSError:  # another process committed the same key first
            shutil.rmtree(tmp, ignore_errors=True)
