"""The reference protocol's image transforms as torch ops on uint8 (C, H, W) tensors.

Train: Resize(256) (shorter side, antialiased bilinear) + RandomCrop(224) + horizontal flip.
Eval:  Resize(256) + CenterCrop(224). CIFAR-style arrays use none (the model resizes inside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_shorter(img: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    h, w = img.shape[-2:]
    if min(h, w) == size:
        return img
    scale = size / min(h, w)
    out_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    x = F.interpolate(img[None].float(), size=out_hw, mode=interpolation, align_corners=False, antialias=True)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def crop(img: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return img[..., top : top + size, left : left + size]


class ProtocolTransform:
    """Resize(resize) then RandomCrop(crop)+flip (train) or CenterCrop(crop) (eval)."""

    def __init__(self, train: bool, resize: int = 256, crop_size: int = 224, interpolation: str = "bilinear"):
        if crop_size > resize:
            raise ValueError(f"crop size {crop_size} must be <= resize {resize}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic; got {interpolation!r}")
        self.train, self.resize, self.crop_size, self.interpolation = train, resize, crop_size, interpolation

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        img = resize_shorter(img, self.resize, self.interpolation)
        h, w = img.shape[-2:]
        s = self.crop_size
        if self.train:
            top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
            img = crop(img, top, left, s)
            if bool(torch.rand((), generator=generator) < 0.5):
                img = img.flip(-1)
            return img.contiguous()
        return crop(img, (h - s) // 2, (w - s) // 2, s).contiguous()

    def __repr__(self) -> str:
        kind = "RandomCrop+flip" if self.train else "CenterCrop"
        interp = "" if self.interpolation == "bilinear" else f", {self.interpolation}"
        return f"Resize({self.resize}{interp})+{kind}({self.crop_size})"
