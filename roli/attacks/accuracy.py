"""Clean and PGD robust accuracy of a model over a set, in one process: the library form of the evaluator
(roli.attacks.evaluation), which computes them (the trainer's validation counts through robust_counts)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from roli.attacks.evaluation import Evaluation, batch_seed

__all__ = ["batch_seed", "robust_accuracy", "robust_counts", "validation_counts"]


class _Numbered:
    """Batches with their indices in the whole set (`ids`): the per-batch attack seeds."""

    def __init__(self, batches, ids):
        self.batches, self.ids = batches, list(ids)

    def __iter__(self):
        return iter(self.batches)


def _batches(data, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple):
        x, y = data
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    return data


def robust_accuracy(
    model,
    data,
    eps: float,
    step_size: float | None = None,
    steps: int = 10,
    precision: str = "fp32",
    seed: int = 0,
    norm: str = "linf",
) -> tuple[float, float]:
    """(clean accuracy, PGD-`steps` robust accuracy) over `data`: a (x, y) pair of tensors (attacked in
    batches of 256) or an iterable of (x, y) batches. Robust means correct on the clean image and on
    every PGD iterate (early stop: the same accuracy, less work). step_size defaults to eps / 4 (the RoLI
    protocol: 2/255 for 8/255), as in eps_sweep, which takes the same (model, data, ...) arguments."""
    if isinstance(data, torch.Tensor):
        raise TypeError("robust_accuracy(model, data, eps): data is a (x, y) pair or an iterable of (x, y) batches")
    step_size = eps / 4 if step_size is None else step_size
    clean, robust, n = robust_counts(model, data, eps, step_size, steps, precision, seed, norm)
    return clean / max(1, n), robust / max(1, n)


def robust_counts(
    model,
    data,
    eps: float,
    step_size: float,
    steps: int,
    precision: str = "fp32",
    seed: int = 0,
    norm: str = "linf",
    batch_ids=None,
) -> tuple[int, int, int]:
    """(clean correct, PGD robust, examples) over `data` in this process (not reduced over torchrun ranks), as
    robust_accuracy counts them. The k-th batch is attacked with seed batch_seed(seed, batch_ids[k]) (default:
    its position k)."""
    t = _totals(model, data, eps, step_size, steps, precision, seed, norm, batch_ids, None)
    return t["clean"], t["pgd"], t["n"]


def validation_counts(model, data, eps, step_size, steps, precision="fp32", seed=0, norm="linf", batch_ids=None,
                      reference_batch: int = 64) -> dict:  # fmt: skip
    """The trainer's validation: robust_counts' counts and the reference's scoring of the same attack pass
    (`pgd_reference`, per batch of `reference_batch`), as Outcomes.totals of this process (not reduced)."""
    return _totals(model, data, eps, step_size, steps, precision, seed, norm, batch_ids, reference_batch)


def _totals(model, data, eps, step_size, steps, precision, seed, norm, batch_ids, reference_batch) -> dict:
    """Evaluation.run over `data` (batch k seeded by batch_ids[k], default k), totals of this process."""
    batches = _batches(data)
    if batch_ids is not None:
        batches = _Numbered(batches, batch_ids)
    evaluation = Evaluation(eps, step_size, steps, norm=norm, precision=precision, seed=seed,
                            reference_batch=reference_batch)  # fmt: skip
    return evaluation.run(model, batches).totals(reduce=False)
