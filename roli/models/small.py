"""Small convolutional networks for small images (digits, MNIST, CIFAR-sized inputs) on a CPU.

SmallCNN follows the timm backbone protocol (num_features, forward_features, forward_head(pre_logits),
reset_classifier, pretrained_cfg["classifier"]), so roli treats it exactly like a timm model.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv blocks (BatchNorm, ReLU; two stride-2), global average pooling, a linear classifier `fc`.

    ~20k parameters at width 32: trains adversarially on 8x8 digits in seconds on a CPU.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_chans, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 2)
        )
        self.num_features = 2 * width
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {"classifier": "fc", "mean": None, "std": None, "input_size": None}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def small_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 32) -> SmallCNN:
    return SmallCNN(num_classes, in_chans, width)
