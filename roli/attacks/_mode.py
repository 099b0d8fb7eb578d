"""How an attack holds a model: eval mode, no parameter gradients, no DDP all-reduce; restored after.

Parameters are switched to requires_grad=False for the attack, so autograd computes input gradients
only (no weight-gradient GEMMs, no .grad written) even for third-party attacks that call .backward().
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap(model: nn.Module) -> nn.Module:
    """The module an attack should call: DDP's inner module (no gradient all-reduce during attacks)."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


@contextlib.contextmanager
def attack_mode(model: nn.Module):
    """Yield the unwrapped model in eval mode with frozen parameters; restore both on exit (even on error)."""
    inner = unwrap(model)
    modes = [(m, m.training) for m in inner.modules()]
    grads = [(p, p.requires_grad) for p in inner.parameters()]
    try:
        inner.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield inner
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
