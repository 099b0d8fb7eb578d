"""How an attack holds a model: eval mode, no parameter gradients, no DDP all-reduce; restored after.

Parameters are switched to requires_grad=False for the attack, so autograd computes input gradients
only (no weight-gradient GEMMs, no .grad written, no activations saved for weight gradients) even for
third-party attacks that call .backward().

An attack runs at every training step, so the walk over the model's modules and parameters is done once
per model and kept (a model's structure is fixed during a stage): the lists are rebuilt whenever any module
or parameter was registered anywhere since (torch's global registration hooks count them: apply_peft, a
replaced head, a new model all register). Only flags that differ from the attack's are written, and put back.
"""

from __future__ import annotations

import contextlib
import weakref

from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.nn.parallel import DistributedDataParallel

_registrations = 0  # modules and parameters registered in this process: the cached walks' validity stamp
_walks: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[nn.Module], list[nn.Parameter]]] = (
    weakref.WeakKeyDictionary()
)


def _count_registration(*_args):
    global _registrations
    _registrations += 1


register_module_module_registration_hook(_count_registration)
register_module_parameter_registration_hook(_count_registration)


def registrations() -> int:
    """How many modules and parameters were registered in this process so far (a cached walk's validity stamp)."""
    return _registrations


def unwrap(model: nn.Module) -> nn.Module:
    """The module an attack should call: DDP's inner module (no gradient all-reduce during attacks)."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _walk(inner: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    cached = _walks.get(inner)
    if cached is not None and cached[0] == _registrations:
        return cached[1], cached[2]
    modules, params = list(inner.modules()), list(inner.parameters())
    _walks[inner] = (_registrations, modules, params)
    return modules, params


@contextlib.contextmanager
def attack_mode(model: nn.Module):
    """Yield the unwrapped model in eval mode with frozen parameters; restore both on exit (even on error)."""
    inner = unwrap(model)
    modules, params = _walk(inner)
    training = [m for m in modules if m.training]
    trainable = [p for p in params if p.requires_grad]
    try:
        for m in training:
            _set_training(m, False)
        for p in trainable:
            p.requires_grad_(False)
        yield inner
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for m in training:
            _set_training(m, True)


def _set_training(m: nn.Module, flag: bool) -> None:
    # What Module.train()/eval() set, written into the instance dict: Module.__setattr__'s checks cost ~20x more
    # (ViT-B: 1.4 ms per attack call). A module whose `training` is not a plain attribute gets setattr.
    if "training" in m.__dict__:
        m.__dict__["training"] = flag
    else:
        m.training = flag
