"""pgd_init: the random start of PGD, uniform in the Linf box or uniform in the L2 ball, then clipped.

Runs once per attack (not in the inner loop), and its random numbers must follow a user's
torch.Generator on any device, so it is one PyTorch implementation for every backend: the draw and a
fused-by-construction handful of element-wise ops in fp32, rounded once to the images' dtype.
Uniform in the L2 ball of dimension d: a Gaussian direction scaled to radius eps * U^(1/d).
"""

from __future__ import annotations

import torch

from roli.ops._args import check_budget, check_clip, check_image, check_norm, per_sample_view


def pgd_init(
    x_nat: torch.Tensor,
    eps: float | torch.Tensor,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """A random start around `x_nat` (a new tensor of its shape, dtype and device).

    Args:
        x_nat: (B, ...) clean images in pixel space.
        eps: budget radius, a float or a (B,) tensor.
        norm: "linf" (uniform in [-eps, eps]^d) or "l2" (uniform in the L2 ball of radius eps).
        generator: optional torch.Generator on x_nat's device, for reproducible starts.
        clip: pixel range (lo, hi) applied last, or None.
    """
    norm = check_norm(norm)
    check_image("x_nat", x_nat)
    lo, hi = check_clip(clip)
    eps_t, eps_f = check_budget("eps", eps, x_nat)
    if generator is not None and torch.device(generator.device).type != x_nat.device.type:
        raise ValueError(f"generator is on {generator.device} but x_nat is on {x_nat.device}")
    batch = x_nat.shape[0]
    e = per_sample_view(eps_t, x_nat.dim()) if eps_t is not None else eps_f
    with torch.no_grad():
        # empty_like keeps x_nat's layout (channels_last stays channels_last for the model that follows).
        noise = torch.empty_like(x_nat, dtype=torch.float32)
        if norm == "linf":
            delta = noise.uniform_(-1.0, 1.0, generator=generator).mul_(e)
        else:
            z = noise.normal_(generator=generator)
            znorm = z.reshape(batch, -1).norm(dim=1).clamp_min_(1e-12)  # (B,)
            d = max(1, x_nat[0].numel())
            radius = torch.rand(batch, generator=generator, device=x_nat.device).pow_(1.0 / d)  # (B,)
            delta = z.mul_(per_sample_view(radius / znorm, z.dim())).mul_(e)
        return delta.add_(x_nat.float()).clamp_(lo, hi).to(x_nat.dtype)
