"""Every check of an attack's arguments, in one place (in the manner of AutoAttack's checks.py).

Attacks validate their configuration once when built (`check_config`) and their inputs once per call
(`check_images`, `check_labels`, `budget`, and `check_logits` on the first forward): the inner loop
runs resolved kernels on values known to be valid.
"""

from __future__ import annotations

import math

import torch

from roli._amp import ATTACK_PRECISIONS
from roli.attacks.losses import LOSSES

NORMS = ("linf", "l2")
KEEPS = ("best", "last")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def check_budget_value(name: str, value, positive: bool = False) -> None:
    """eps / step_size: a finite number (>= 0, or > 0 when `positive`), or a tensor of finite values >= 0
    (per-sample budgets: a zero budget, as an eps-sweep's 0, takes zero-length steps)."""
    if isinstance(value, torch.Tensor):
        if value.numel() and (not bool(torch.isfinite(value).all()) or float(value.min()) < 0):
            raise ValueError(f"{name} must be finite and >= 0; got a tensor with min {float(value.min())}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or a (B,) tensor; got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}; got {value}")


def _count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def check_config(c) -> None:
    """A PGD configuration (roli.attacks.pgd.PGDConfig), checked once when built."""
    if c.memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}; got {c.memory_format!r}")
    check_budget_value("eps", c.eps)
    check_budget_value("step_size", c.step_size, positive=True)
    _count("steps", c.steps, 0)
    _count("restarts", c.restarts, 1)
    if c.norm not in NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2'; got {c.norm!r}")
    if c.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {c.loss!r}")
    if c.keep not in KEEPS:
        raise ValueError(f"keep must be 'best' or 'last'; got {c.keep!r}")
    if c.precision not in ATTACK_PRECISIONS:
        raise ValueError(f"precision must be one of {ATTACK_PRECISIONS}; got {c.precision!r}")
    if c.reference_chunk is not None:
        _count("reference_chunk", c.reference_chunk, 1)
        if c.keep != "best" or c.early_stop or c.cuda_graph:
            raise ValueError(
                "reference_chunk scores every iterate of every example: it needs keep='best', early_stop=False "
                "and cuda_graph=False"
            )
    if c.cuda_graph and (c.keep != "last" or c.restarts != 1 or c.early_stop):
        raise ValueError("cuda_graph=True records a static loop: it needs keep='last', restarts=1 and early_stop=False")


def budget(value, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """A validated budget in the kernels' form for the batch x: (per-sample float32 tensor, 0.0) or (None, float)."""
    if isinstance(value, torch.Tensor):
        if value.shape != (x.shape[0],):
            raise ValueError(f"a per-sample budget must have shape ({x.shape[0]},); got {tuple(value.shape)}")
        return value.detach().to(device=x.device, dtype=torch.float32).contiguous(), 0.0
    return None, float(value)


def check_labels(name: str, y, x: torch.Tensor, values: bool = True) -> None:
    """Type, shape and device (no host synchronisation); with `values`, also >= 0 (one)."""
    if not isinstance(y, torch.Tensor) or y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must be an integer tensor of class indices; got {getattr(y, 'dtype', type(y))}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape ({x.shape[0]},), one label per image; got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but the images are on {x.device}")
    if values and y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} must be >= 0; got {int(y.min())}")


def invalid_values(y: torch.Tensor, logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """What check_labels/check_logits check on values, as one bool tensor on the device and no host
    synchronisation (training attacks: the trainer reads it at its own synchronisation points)."""
    bad = ~torch.isfinite(logits).all()
    if y.numel():
        bad = bad | (y.min() < 0) | (y.max() >= logits.shape[1])
    if target is not None and target.numel():
        bad = bad | (target.min() < 0) | (target.max() >= logits.shape[1])
    return bad


def invalid_range(x: torch.Tensor, clip: tuple[float, float] | None) -> torch.Tensor | None:
    """What check_images checks on values (the pixel range), as a bool device tensor (None: nothing to check)."""
    if clip is None or not x.numel():
        return None
    return (x.min() < clip[0] - 1e-6) | (x.max() > clip[1] + 1e-6)


def check_images(x, clip: tuple[float, float] | None, values: bool = True) -> None:
    """Type and shape; with `values`, also the pixel range (one host synchronisation for min and max)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"images must be a floating-point tensor in pixel space; got {getattr(x, 'dtype', type(x).__name__)} "
            "(convert with x.float() / 255)"
        )
    if x.dim() < 2:
        raise ValueError(f"images must have shape (B, ...); got {tuple(x.shape)}")
    if values and clip is not None and x.numel():
        lo, hi = torch.stack([x.min(), x.max()]).float().tolist()
        if lo < clip[0] - 1e-6 or hi > clip[1] + 1e-6:
            raise ValueError(
                f"images must lie in [{clip[0]:g}, {clip[1]:g}] (pixel space; normalisation belongs inside the "
                f"model); got values in [{lo:.4g}, {hi:.4g}]"
            )


def check_logits_shape(logits: torch.Tensor, x: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"the model must return logits of shape (B, K); got {tuple(logits.shape)}")


def check_logits(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> None:
    """The model's output on the first forward of an attack: (B, K), labels < K, finite (one host
    synchronisation for all three values)."""
    check_logits_shape(logits, x)
    values = [y.max()] + ([target.max()] if target is not None else []) + [torch.isfinite(logits).all()]
    y_max, *t_max, finite = torch.stack([v.double() for v in values]).tolist()  # the batch is never empty here
    if y_max >= logits.shape[1] or (t_max and t_max[0] >= logits.shape[1]):
        raise ValueError(f"labels must be < the number of classes ({logits.shape[1]}); got {int(y_max)}")
    if not finite:
        raise ValueError("the model returned non-finite logits (NaN/inf) on these images")
