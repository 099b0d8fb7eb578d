"""Adversarial linear probing (ALP), stage 1 of RoLI.

The backbone is frozen (requires_grad=False, eval mode); the linear head trains on PGD examples made
through the whole model. One step costs k attack steps x (forward + input-gradient backward) plus one
forward: the head update uses the features of the final adversarial batch computed without a backbone
graph (the reference code spends one more forward with a graph and keeps a batch-level best iterate).
Model selection: PGD robust accuracy on the validation set every epoch; the best head is kept and
returned, and optionally saved with the model in the checkpoint format the finetuning stage reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from roli.attacks import PGD
from roli.attacks.pgd import autocast_for
from roli.models import apply_peft, save_checkpoint
from roli.schedule import warmup_cosine


@dataclass
class ALPResult:
    weight: torch.Tensor  # (C, D): the best head
    bias: torch.Tensor
    best_epoch: int
    val_robust: float
    val_clean: float
    history: list[dict] = field(default_factory=list)


def _batches(val) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(val, tuple):
        x, y = val
        return [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
    return val


def robust_accuracy(model, val, eps: float, step_size: float, steps: int, precision: str = "fp32",
                    seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """(clean accuracy, PGD robust accuracy) over val: a (x, y) pair of tensors or an iterable of batches."""
    clean = robust = n = 0
    attack = PGD(model, eps=eps, step_size=step_size, steps=steps, early_stop=True, precision=precision, seed=seed)
    for x, y in _batches(val):
        res = attack.perturb(x, y)
        with torch.no_grad(), autocast_for(x.device, precision):
            ok = model.eval()(x).argmax(1) == y
        clean += int(ok.sum())
        robust += int((ok & ~res.success).sum())
        n += len(y)
    return clean / max(1, n), robust / max(1, n)


def fast_layout(model, precision: str, channels_last: bool | None = None) -> bool:
    """Put a convolutional backbone in channels_last for bf16 (same values, another memory layout)."""
    if channels_last is None:
        channels_last = precision == "bf16" and any(isinstance(m, torch.nn.Conv2d) for m in model.backbone.modules())
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    return channels_last


def alp_step(model, attack: PGD, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             precision: str = "fp32", before_step=None) -> tuple[float, int]:  # fmt: skip
    """One ALP step: k attack steps through the frozen model, then the head update on the features of the
    final adversarial batch, computed without a backbone graph. Returns (loss, correct count)."""
    x_adv = attack(x, y)
    with torch.no_grad(), autocast_for(x.device, precision):
        feats = model.features(x_adv).float()
    logits = model.head(feats)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()  # e.g. averaging the head's gradients over ranks
    opt.step()
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


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
    """Train the head of a RobustClassifier adversarially with its backbone frozen.

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
    """
    apply_peft(model, "linear")
    fast_layout(model, precision, channels_last)
    if init_head is not None:
        with torch.no_grad():
            model.head.weight.copy_(init_head[0])
            model.head.bias.copy_(init_head[1])
    opt = torch.optim.SGD([{"params": [model.head.weight], "weight_decay": weight_decay},
                           {"params": [model.head.bias], "weight_decay": 0.0}], lr=lr, momentum=momentum)  # fmt: skip
    attack = PGD(model, eps=eps, step_size=step_size, steps=steps, keep="last", precision=precision, seed=seed)
    best = (-1.0, 0.0, -1, model.head.weight.detach().clone(), model.head.bias.detach().clone())
    history = []
    for epoch in range(epochs):
        factor = warmup_cosine(epoch, epochs, warmup)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        model.train()  # the head; the frozen backbone stays in eval mode
        for x, y in train:
            loss, ok = alp_step(model, attack, opt, x, y, precision)
            seen += len(y)
            loss_sum += loss * len(y)
            correct += ok
        seconds = time.time() - t0
        clean, robust = robust_accuracy(model, val, eps, step_size, val_steps, precision, seed)
        row = {"epoch": epoch, "lr": lr * factor, "train_loss": loss_sum / max(1, seen),
               "train_robust_acc": correct / max(1, seen), "val_clean": clean, "val_robust": robust,
               "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds}  # fmt: skip
        history.append(row)
        if log:
            log(f"ALP epoch {epoch}: loss {row['train_loss']:.4f}, val clean {clean:.4f}, val PGD-{val_steps} "
                f"{robust:.4f}, {row['images_per_s']:.1f} img/s")  # fmt: skip
        if robust > best[0]:
            best = (robust, clean, epoch, model.head.weight.detach().clone(), model.head.bias.detach().clone())
    robust, clean, epoch, w, b = best
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
    if checkpoint is not None:
        save_checkpoint(model, checkpoint, meta={"stage": "alp", "epoch": epoch, "val_robust": robust,
                                                 "val_clean": clean, "backbone": model.name})  # fmt: skip
    return ALPResult(w, b, epoch, robust, clean, history)
