"""Clean and PGD robust accuracy of a model over a validation or test set (model selection, test metrics)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from roli.attacks.pgd import PGD
from roli.seeds import derive_seed


def _batches(data, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple):
        x, y = data
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    return data


def batch_seed(seed: int, index: int) -> int:
    """The attack seed of batch `index` of an evaluation: its random starts depend on the batch, never on the
    process that attacks it, so a sharded evaluation equals one process's example by example."""
    return derive_seed(seed, "evaluation", index=index)


def robust_accuracy(model, data, eps: float, step_size: float | None = None, steps: int = 10,
                    precision: str = "fp32", seed: int = 0, norm: str = "linf") -> tuple[float, float]:  # fmt: skip
    """(clean accuracy, PGD-`steps` robust accuracy) over `data`: a (x, y) pair of tensors (attacked in
    batches of 256) or an iterable of (x, y) batches. Robust means correct on the clean image and on
    every PGD iterate (early stop: the same accuracy, less work). step_size defaults to eps / 4 (the RoLI
    protocol: 2/255 for 8/255), as in eps_sweep, which takes the same (model, data, ...) arguments."""
    if isinstance(data, torch.Tensor):
        raise TypeError("robust_accuracy(model, data, eps): data is a (x, y) pair or an iterable of (x, y) batches")
    step_size = eps / 4 if step_size is None else step_size
    clean, robust, n = robust_counts(model, data, eps, step_size, steps, precision, seed, norm)
    return clean / max(1, n), robust / max(1, n)


def robust_counts(model, data, eps: float, step_size: float, steps: int, precision: str = "fp32",
                  seed: int = 0, norm: str = "linf", batch_ids=None) -> tuple[int, int, int]:  # fmt: skip
    """(clean correct, PGD robust, examples) over `data`, as robust_accuracy counts them. The k-th batch is
    attacked with seed batch_seed(seed, batch_ids[k]) (default: its position k)."""
    clean = robust = n = 0
    attack = PGD(model, eps=eps, step_size=step_size, steps=steps, norm=norm, early_stop=True, precision=precision,
                 seed=seed)  # fmt: skip
    for k, (x, y) in enumerate(_batches(data)):
        attack.reseed(batch_seed(seed, batch_ids[k] if batch_ids is not None else k))
        res = attack.perturb(x, y)  # early_stop: the clean image is its first iterate (no second forward)
        ok = ~res.clean_success
        clean += int(ok.sum())
        robust += int((ok & ~res.success).sum())
        n += len(y)
    return clean, robust, n
