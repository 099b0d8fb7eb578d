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


def alp_step(
    model,
    attack: PGD,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str = "fp32",
    before_step=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ALP step: k attack steps through the frozen model, then the head update on the features of the
    final adversarial batch, computed without a backbone graph. Returns (loss, correct count) as 0-dim tensors
    on the device (reading them would synchronise)."""
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
    return loss.detach(), (logits.argmax(1) == y).sum()
