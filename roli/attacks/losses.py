"""Per-sample attack losses (to be maximised), computed in fp32 from the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "dlr")


def ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the true class (untargeted), or minus the cross-entropy of the target (targeted)."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein, ICML 2020): shift- and scale-invariant margin loss.

    Untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3). Targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2),
    where z_pi are the sorted logits. Needs at least 3 classes (4 when targeted).
    """
    need = 4 if target is not None else 3
    if logits.shape[1] < need:
        raise ValueError(f"the DLR loss needs at least {need} classes; the model has {logits.shape[1]}")
    z_sorted, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None])[:, 0]
    if target is None:
        other = torch.where(z_sorted[:, 0] == z_y, z_sorted[:, 1], z_sorted[:, 0])  # best wrong class
        return -(z_y - other) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + 1e-12)


def attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    return ce_loss(logits, y, target) if name == "ce" else dlr_loss(logits, y, target)
