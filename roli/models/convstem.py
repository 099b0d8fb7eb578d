"""ConvNeXt with a convolutional stem (Singh, Croce, Hein, "Revisiting Adversarial Training for ImageNet",
NeurIPS 2023; RobustBench's Singh2023Revisiting_ConvNeXt-*-ConvStem): timm's ConvNeXt with its 4x4
patchify stem replaced by strided 3x3 convolutions, each followed by a channels-first LayerNorm and GELU.

The module names (stem.stem.0, .1, .3, .4, ...) are those of the published checkpoints, so the files load
strictly. The architecture facts (widths, strides) are the paper's; the code is roli's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from roli._compat import import_timm


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of (B, C, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """Strided 3x3 convolutions (widths `widths`, strides `strides`), each + LayerNorm + GELU; 4x down."""

    def __init__(self, in_chans: int, widths: tuple[int, ...], strides: tuple[int, ...]):
        super().__init__()
        layers, cin = [], in_chans
        for w, s in zip(widths, strides, strict=True):
            layers += [nn.Conv2d(cin, w, 3, stride=s, padding=1), ChannelsFirstLayerNorm(w), nn.GELU()]
            cin = w
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def _convnext(variant: str, widths, strides, in_chans: int = 3, **kwargs) -> nn.Module:
    timm = import_timm()
    net = timm.create_model(variant, pretrained=False, in_chans=in_chans, **kwargs)
    net.stem = ConvStem(in_chans, widths, strides)
    return net


# The stems of the four published models: ConvNeXt-T/S end the stem at 96 channels (two stride-2 convs),
# ConvNeXt-B at 128 and ConvNeXt-L at 192 (two stride-2 convs and one stride-1 conv).
def convnext_tiny_convstem(**kwargs) -> nn.Module:
    return _convnext("convnext_tiny", (48, 96), (2, 2), **kwargs)


def convnext_small_convstem(**kwargs) -> nn.Module:
    return _convnext("convnext_small", (48, 96), (2, 2), **kwargs)


def convnext_base_convstem(**kwargs) -> nn.Module:
    return _convnext("convnext_base", (64, 96, 128), (2, 2, 1), **kwargs)


def convnext_large_convstem(**kwargs) -> nn.Module:
    return _convnext("convnext_large", (96, 144, 192), (2, 2, 1), **kwargs)
