"""The model contract of roli: images in [0, 1] pixel space in, logits out.

Normalisation (and, for the RoLI CIFAR protocol, a bilinear resize 32 -> 224) happens inside the
model, so an attack perturbs and projects the raw image, where the budget (8/255) is defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


class Preprocess(nn.Module):
    """x (B, C, H, W) in [0, 1] -> normalize(resize(x)). Buffers are not saved in state dicts.

    The resize (to `input_size`, when the images have another size) is bilinear by default, as the RoLI
    reference resizes CIFAR's 32x32 images to 224 inside its model; "bicubic" is the other choice."""

    def __init__(
        self,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        input_size: int | tuple[int, int] | None = None,
        interpolation: str = "bilinear",
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
        self.interpolation = interpolation
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0 per channel; got {tuple(std)}")
        if mean is not None and len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else input_size
        if mean is None:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)
        else:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False)
        if self.mean is not None:
            if x.shape[1] != self.mean.shape[1]:
                raise ValueError(f"images have {x.shape[1]} channels but mean/std have {self.mean.shape[1]}")
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x


class NormalizedModel(nn.Module):
    """`forward(x) = model(normalize(resize(x)))` for x of shape (B, C, H, W) in [0, 1].

    Args:
        model: the network on normalised inputs, returning logits (B, num_classes).
        mean, std: per-channel statistics (length C), or None for no normalisation.
        input_size: (H, W) to resize to inside the model (bilinear, as the reference), or None.
    """

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=None):
        super().__init__()
        self.pre = Preprocess(mean, std, input_size)
        self.model = model

    @property
    def mean(self):
        return self.pre.mean

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.pre(x))
