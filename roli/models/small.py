"""Small convolutional networks for small images (digits, MNIST, CIFAR-sized inputs) on a CPU."""

from __future__ import annotations

from torch import nn


def small_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 32) -> nn.Module:
    """Three conv blocks (BatchNorm, ReLU; two stride-2), global average pooling, a linear head.

    ~20k parameters at width 32: trains adversarially on 8x8 digits in seconds on a CPU.
    """

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(in_chans, width, 1),
        *block(width, 2 * width, 2),
        *block(2 * width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
