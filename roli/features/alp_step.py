"""The step of adversarial linear probing (ALP), stage 1 of RoLI.

The backbone is frozen (requires_grad=False, eval mode); the linear head trains on PGD examples made
through the whole model. One step costs k attack steps x (forward + input-gradient backward) plus one
forward: the head update uses the features of the final adversarial batch computed without a backbone
graph (the reference code spends one more forward with a graph and keeps a batch-level best iterate).
The epoch loop around it (schedule, validation, model selection, checkpoints) is the trainer's:
roli.training.adversarial_linear_probe and `python -m roli.train --method alp`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from roli._amp import autocast_for
from roli.attacks import PGD


def fast_layout(model, precision: str, channels_last: bool | None = None) -> bool:
    """Put a convolutional backbone in channels_last for bf16 (same values, another memory layout)."""
    if channels_last is None:
        channels_last = precision == "bf16" and any(isinstance(m, torch.nn.Conv2d) for m in model.backbone.modules())
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    return channels_last


def micro_batches(x: torch.Tensor, y: torch.Tensor, k: int):
    """(x_i, y_i, w_i): the batch in k near-equal parts, w_i = len(part) / len(batch), so that the sum of the parts'
    mean losses weighted by w_i is the batch's mean loss (gradient accumulation that equals the whole batch). One
    part (k = 1): the batch itself with w = None (no weighting: the step launches nothing it did not before)."""
    n = len(y)
    if k <= 1 or n <= 1:
        yield x, y, None
        return
    for xi, yi in zip(x.tensor_split(min(k, n)), y.tensor_split(min(k, n)), strict=True):
        yield xi, yi, len(yi) / n


def weighted(loss: torch.Tensor, w: float | None) -> torch.Tensor:
    return loss if w is None else loss * w


def tally(acc: tuple | None, loss: torch.Tensor, correct: torch.Tensor) -> tuple:
    """The step's (loss, correct) summed over its micro-batches (the first part's tensors as they are)."""
    return (loss.detach(), correct) if acc is None else (acc[0] + loss.detach(), acc[1] + correct)


def update(opt: torch.optim.Optimizer, scaler, before_step=None) -> None:
    """The optimiser step after the (accumulated) backward passes: through the GradScaler in fp16 (unscaled first,
    so `before_step`, e.g. averaging over ranks, sees true gradients; a step with inf/NaN gradients is skipped)."""
    if scaler is not None:
        scaler.unscale_(opt)
    if before_step is not None:
        before_step()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def alp_step(
    model,
    attack: PGD,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str = "fp32",
    before_step=None,
    scaler=None,
    accumulate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ALP step: k attack steps through the frozen model, then the head update on the features of the
    final adversarial batch, computed without a backbone graph (with `accumulate` > 1: per micro-batch, one
    update). Returns (loss, correct count) as 0-dim tensors on the device (reading them would synchronise)."""
    opt.zero_grad(set_to_none=True)
    acc = None
    for xi, yi, w in micro_batches(x, y, accumulate):
        x_adv = attack(xi, yi)
        with torch.no_grad(), autocast_for(xi.device, precision):
            feats = model.features(x_adv).float()
        logits = model.head(feats)
        loss = weighted(F.cross_entropy(logits, yi), w)
        backward(loss, scaler)
        acc = tally(acc, loss, (logits.argmax(1) == yi).sum())
    update(opt, scaler, before_step)  # before_step: e.g. averaging the head's gradients over ranks
    return acc
