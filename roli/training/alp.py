"""Adversarial linear probing (ALP) as a library call: the trainer's own stage, without a run directory.

`python -m roli.train --method alp` and this function run the same step (roli.features.alp_step) in the
same epoch loop (roli.training.loop.fit): schedule, validation, model selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from roli.attacks import PGD
from roli.features import fast_layout
from roli.models import apply_peft, save_checkpoint
from roli.training.loop import Stage, alp_stage_step, fit, make_optimizer, param_groups


@dataclass
class ALPResult:
    weight: torch.Tensor  # (C, D): the best head
    bias: torch.Tensor
    best_epoch: int
    val_robust: float
    val_clean: float
    history: list[dict] = field(default_factory=list)


def adversarial_linear_probe(
    model,
    train: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val,
    *,
    epochs: int = 20,
    lr: float = 0.0125,
    weight_decay: float = 0.01,
    momentum: float = 0.9,
    warmup: int = 10,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 7,
    val_steps: int = 10,
    precision: str = "fp32",
    init_head: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint: str | Path | None = None,
    channels_last: bool | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> ALPResult:
    """Train the head of a RobustClassifier adversarially with its backbone frozen; the model is left
    holding the best head (by validation PGD accuracy).

    Args:
        model: a RobustClassifier (its backbone is frozen here; the "linear" PEFT method).
        train: an iterable of (x in [0, 1], y) batches per epoch (ArrayLoader / FileLoader; set_epoch is
            called when present).
        val: (x, y) tensors or an iterable of batches, for PGD-`val_steps` model selection.
        epochs, lr, weight_decay, momentum, warmup: SGD on the head, weight decay on its weight only,
            the warmup-cosine schedule per epoch (reference CIFAR-10: 20 epochs, lr 0.0125, wd 0.01).
        eps, step_size, steps: the training attack (reference: Linf 8/255, 2/255, PGD-7, random start).
        init_head: (weight, bias) to start from, e.g. the clean linear-probe head (warm start).
        checkpoint: where to save the model with the best head (atomic), for the finetuning stage.
        channels_last: run the frozen backbone in channels_last; None: when precision is bf16 and the
            backbone has convolutions (oneDNN's bf16 convolutions are 1.2-1.5x faster in it on CPU).
        log: receives one line per epoch (None: silent).
    """
    apply_peft(model, "linear")
    fast_layout(model, precision, channels_last)
    if init_head is not None:
        with torch.no_grad():
            model.head.weight.copy_(init_head[0])
            model.head.bias.copy_(init_head[1])
    opt = make_optimizer(param_groups(model, weight_decay), "sgd", lr, momentum)
    attack = PGD(model, eps=eps, step_size=step_size, steps=steps, keep="last", precision=precision, seed=seed)
    stage = Stage(
        name="alp",
        model=model,
        step=alp_stage_step(model, attack, opt, precision),
        train=train,
        val=val,
        optimizer=opt,
        epochs=epochs,
        warmup=warmup,
        attack=attack,
        eps=eps,
        step_size=step_size,
        val_steps=val_steps,
        precision=precision,
        seed=seed,
    )
    best = fit(stage, None, progress=False, report=log or (lambda line: None))
    if checkpoint is not None:
        meta = {"stage": "alp", **best, "backbone": model.name}
        save_checkpoint(model, checkpoint, meta=meta)
    w, b = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    return ALPResult(w, b, best["epoch"], best["val_robust"], best["val_clean"], stage.history)
