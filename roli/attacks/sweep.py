"""Robust accuracy at several budgets in one batched run.

The batch is replicated once per budget and attacked with a per-sample eps/step tensor, so the whole
sweep is one PGD run (one kernel launch per step) instead of one run per budget.
"""

from __future__ import annotations

import torch
from torch import nn

from roli._amp import autocast_for
from roli.attacks._mode import attack_mode
from roli.attacks.pgd import PGD


@torch.no_grad()
def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """(B,) bool: the model classifies the clean images correctly (eval mode, restored after)."""
    with attack_mode(model) as m, autocast_for(x.device, precision):
        return m(x).argmax(1) == y


def eps_sweep(
    model: nn.Module,
    data,
    eps: list[float],
    steps: int = 10,
    step_ratio: float = 0.25,
    chunk_size: int | None = None,
    **pgd_kwargs,
) -> dict[float, float]:
    """Robust accuracy (fraction of samples correct on the clean image and on every iterate) per budget.

    Called as robust_accuracy is: `eps_sweep(model, (x, y), [2/255, 4/255, 8/255])`.

    Args:
        model: as for PGD.
        data: a (x, y) pair of tensors (one batch; chunk_size bounds memory) or an iterable of (x, y) batches.
        eps: the budgets, e.g. [1/255, 2/255, 4/255, 8/255].
        steps: PGD steps; the step size is step_ratio * eps (the RoLI protocol: 2/255 for 8/255).
        chunk_size: at most this many (replicated) samples per PGD run, to bound memory.
        pgd_kwargs: any other PGD argument (norm, restarts, random_start, loss, precision, seed, impl, ...).
    """
    if isinstance(data, torch.Tensor):
        raise TypeError("eps_sweep(model, data, eps): data is a (x, y) pair or an iterable of (x, y) batches")
    if not eps:
        raise ValueError("eps must list at least one budget")
    if any(e < 0 for e in eps):
        raise ValueError(f"budgets must be >= 0; got {eps}")
    if step_ratio <= 0:
        raise ValueError(f"step_ratio must be > 0; got {step_ratio}")
    batches = [data] if isinstance(data, tuple) else data
    counts, total = torch.zeros(len(eps), dtype=torch.float64), 0
    for x, y in batches:
        counts += _sweep_counts(model, x, y, eps, steps, step_ratio, chunk_size, pgd_kwargs)
        total += len(y)
    return {float(e): float(counts[i]) / max(1, total) for i, e in enumerate(eps)}


def _sweep_counts(model, x, y, eps, steps, step_ratio, chunk_size, pgd_kwargs) -> torch.Tensor:
    """(len(eps),) robust counts of one batch: the batch replicated once per budget, one PGD run."""
    n, batch = len(eps), x.shape[0]
    xs = x.repeat((n,) + (1,) * (x.dim() - 1))
    ys = y.repeat(n)
    eps_t = torch.tensor(eps, dtype=torch.float32, device=x.device).repeat_interleave(batch)
    chunk = chunk_size or xs.shape[0]
    broken = torch.empty(xs.shape[0], dtype=torch.bool, device=x.device)
    pgd_kwargs = {"keep": "best", **pgd_kwargs}
    for start in range(0, xs.shape[0], chunk):
        sl = slice(start, start + chunk)
        attack = PGD(model, eps=eps_t[sl], step_size=eps_t[sl] * step_ratio, steps=steps, **pgd_kwargs)
        broken[sl] = attack.perturb(xs[sl], ys[sl]).success
    correct = clean_correct(model, x, y, pgd_kwargs.get("precision", "fp32"))
    robust = (~broken).view(n, batch) & correct[None]
    return robust.sum(1).double().cpu()
