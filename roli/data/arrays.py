"""Image arrays held in memory as tensors in [0, 1], shape (N, C, H, W), with int64 labels.

Specs: "digits" (scikit-learn's 8x8 digits, 1 channel, a fixed 80/20 train/test split with seed 0) and
"npz:PATH" (keys x/y, or x_<split>/y_<split>; uint8 images NHWC, NCHW or NHW, or floats in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ArraySplit:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    num_classes: int
    name: str


def _to_nchw(x: np.ndarray, source: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{source}: images must have 3 or 4 dimensions (N,H,W / NHWC / NCHW); got shape {x.shape}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.uint8:
        return t.float().div_(255)
    t = t.float()
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(f"{source}: float images must lie in [0, 1]; got [{float(t.min()):.3g}, {float(t.max()):.3g}]")
    return t


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    cut = int(0.8 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    return (d.images[idx] / 16.0).astype(np.float32), d.target[idx]


def _npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        for xk, yk in ((f"x_{split}", f"y_{split}"), ("x", "y")):
            if xk in f and yk in f:
                return f[xk], f[yk]
        raise ValueError(f"{path}: no arrays x_{split}/y_{split} or x/y (has {sorted(f.keys())})")


def load_arrays(spec: str, split: str = "test", n: int | None = None) -> ArraySplit:
    """Load a dataset spec ("digits" or "npz:PATH") split ("train" or "test"), first `n` examples."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if spec == "digits":
        x, y = _digits(split)
    elif spec.startswith("npz:"):
        x, y = _npz(Path(spec[4:]).expanduser(), split)
    else:
        raise ValueError(f"unknown dataset {spec!r}; use 'digits' or 'npz:PATH'")
    if n is not None:
        if n < 1:
            raise ValueError(f"the number of examples must be >= 1; got {n}")
        x, y = x[:n], y[:n]
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64).reshape(-1)
    if len(yt) != len(x):
        raise ValueError(f"{spec}: {len(x)} images but {len(yt)} labels")
    if len(yt) and int(yt.min()) < 0:
        raise ValueError(f"{spec}: labels must be >= 0; got {int(yt.min())}")
    num_classes = 10 if spec == "digits" else int(yt.max()) + 1 if len(yt) else 0
    return ArraySplit(_to_nchw(np.asarray(x), spec), yt, num_classes, spec)
