"""Clean linear probing on (cached) features, one head or a sweep of many heads in one pass.

A sweep stacks H heads as one (H, C, D) weight and trains them together: one batched matmul per
mini-batch over features that are read once, each head with its own learning rate and weight decay
(on the weight only). SGD with momentum or AdamW, the warmup-cosine schedule of the trainer (per
epoch), full-batch or mini-batch, on the features' device. The best head is chosen by validation
accuracy (at its best epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from roli.schedule import warmup_cosine

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class ProbeResult:
    weight: torch.Tensor  # (C, D) of the best head at its best epoch
    bias: torch.Tensor  # (C,)
    lr: float
    weight_decay: float
    val_acc: float
    epoch: int
    history: list[dict] = field(default_factory=list)  # per epoch: train loss and val acc of every head


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D) x (H, C, D) -> (B, H, C) as one GEMM against the (H*C, D) view: no copy of the weights."""
    heads, classes, dim = w.shape
    return torch.addmm(b.reshape(-1), x, w.reshape(heads * classes, dim).t()).view(-1, heads, classes)


def accuracy(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 65536):
    """Accuracy of head(s) on features: weight (C, D) -> float, or (H, C, D) -> (H,) tensor."""
    stacked = weight.dim() == 3
    w, b = (weight, bias) if stacked else (weight[None], bias[None])
    correct = torch.zeros(w.shape[0], device=w.device)
    for i in range(0, len(y), chunk):
        xb, yb = x[i : i + chunk].to(w.device, w.dtype), y[i : i + chunk].to(w.device)
        logits = _logits(xb, w, b)  # (B, H, C)
        correct += (logits.argmax(-1) == yb[:, None]).sum(0)
    acc = correct / max(1, len(y))
    return acc if stacked else float(acc[0])


def train_linear_probes(
    train: tuple[torch.Tensor, torch.Tensor] | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    lrs: list[float],
    weight_decays: list[float] | None = None,
    epochs: int = 20,
    warmup: int = 0,
    batch_size: int | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    seed: int = 0,
    device=None,
) -> ProbeResult:
    """Train len(lrs) heads (lrs[i] with weight_decays[i]) at once; return the best by validation accuracy.

    Args:
        train: (features (N, D), labels (N,)), or a function epoch -> (features, labels) (used to compare
            with recomputing the features every epoch; the cached path passes tensors).
        val: validation (features, labels).
        lrs, weight_decays: one entry per head (weight decay on the weight only; default 0).
        batch_size: None for full-batch steps, else mini-batches in a seeded order per epoch.
        device: where to train (default: the features' device).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    if not lrs or any(lr < 0 for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of rates >= 0; got {lrs}")
    wds = list(weight_decays) if weight_decays is not None else [0.0] * len(lrs)
    if len(wds) != len(lrs):
        raise ValueError(f"{len(lrs)} learning rates but {len(wds)} weight decays")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    get = train if callable(train) else (lambda epoch: train)
    first = get(0)
    x0 = first[0]
    device = torch.device(device) if device is not None else x0.device
    heads, dim = len(lrs), x0.shape[1]
    gen = torch.Generator().manual_seed(seed)
    init = torch.nn.Linear(dim, num_classes)  # the same init for every head, seeded
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        init.reset_parameters()
    w = init.weight.detach().to(device).expand(heads, -1, -1).clone().requires_grad_(True)  # (H, C, D)
    b = init.bias.detach().to(device).expand(heads, -1).clone().requires_grad_(True)  # (H, C)
    lr_t = torch.tensor(lrs, device=device).view(-1, 1, 1)
    wd_t = torch.tensor(wds, device=device).view(-1, 1, 1)
    state = {
        "m_w": torch.zeros_like(w),
        "m_b": torch.zeros_like(b),
        "v_w": torch.zeros_like(w),
        "v_b": torch.zeros_like(b),
        "t": 0,
    }
    vx, vy = val[0].to(device), val[1].to(device)
    best_acc = torch.full((heads,), -1.0, device=device)
    best_w, best_b, best_epoch = w.detach().clone(), b.detach().clone(), torch.zeros(heads, dtype=torch.long)
    history = []
    for epoch in range(epochs):
        x, y = first if epoch == 0 else get(epoch)
        x, y = x.to(device), y.to(device)
        factor = warmup_cosine(epoch, epochs, warmup)
        n = len(y)
        order = torch.randperm(n, generator=gen).to(device) if batch_size else torch.arange(n, device=device)
        size = batch_size or n
        total = torch.zeros(heads, device=device)
        for i in range(0, n, size):
            idx = order[i : i + size]
            xb, yb = x[idx].to(w.dtype), y[idx]
            logits = _logits(xb, w, b)  # (B, H, C)
            loss = F.cross_entropy(logits.permute(0, 2, 1), yb[:, None].expand(-1, heads), reduction="none")
            per_head = loss.mean(0)  # (H,): each head's own mean loss, so the heads' gradients are independent
            gw, gb = torch.autograd.grad(per_head.sum(), [w, b])
            _step(w, b, gw, gb, lr_t * factor, wd_t, optimizer, momentum, state)
            total += per_head.detach() * len(idx)
        acc = accuracy(w.detach(), b.detach(), vx, vy)
        better = acc > best_acc
        best_acc = torch.where(better, acc, best_acc)
        best_w[better], best_b[better] = w.detach()[better], b.detach()[better]
        best_epoch[better.cpu()] = epoch
        history.append(
            {"epoch": epoch, "lr_factor": factor, "train_loss": (total / n).tolist(), "val_acc": acc.tolist()}
        )
    h = int(best_acc.argmax())
    return ProbeResult(
        best_w[h].clone(), best_b[h].clone(), lrs[h], wds[h], float(best_acc[h]), int(best_epoch[h]), history
    )


@torch.no_grad()
def _step(w, b, gw, gb, lr, wd, optimizer, momentum, state) -> None:
    if optimizer == "sgd":
        gw = gw + wd * w  # weight decay on the weight only
        state["m_w"].mul_(momentum).add_(gw)
        state["m_b"].mul_(momentum).add_(gb)
        w.sub_(lr * state["m_w"])
        b.sub_(lr[:, :, 0] * state["m_b"])
        return
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    state["t"] += 1
    t = state["t"]
    w.mul_(1 - lr * wd)  # decoupled weight decay, weight only
    for p, g, m, v, rate in ((w, gw, state["m_w"], state["v_w"], lr), (b, gb, state["m_b"], state["v_b"], lr[:, :, 0])):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.sub_(rate * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps))


def train_linear_probe(train, val, num_classes: int, lr: float, weight_decay: float = 0.0, **kwargs) -> ProbeResult:
    """One head: train_linear_probes with a single learning rate and weight decay."""
    return train_linear_probes(train, val, num_classes, [lr], [weight_decay], **kwargs)
