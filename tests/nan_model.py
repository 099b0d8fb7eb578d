"""A model factory for the trainer tests: a small CNN whose outputs turn NaN after `after` forward calls."""

from __future__ import annotations

from roli.models.small import SmallCNN


class NaNAfter(SmallCNN):
    def __init__(self, after: int = 40, **kwargs):
        super().__init__(**kwargs)
        self.after, self.calls = after, 0

    def forward_features(self, x):
        self.calls += 1
        out = super().forward_features(x)
        return out * float("nan") if self.calls > self.after else out


def make(after: int = 40, in_chans: int = 1) -> NaNAfter:
    return NaNAfter(after=after, num_classes=0, in_chans=in_chans)
