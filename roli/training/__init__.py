"""The trainer: configuration, the resumable epoch loop, each method's stages, the built-in demonstration.

`python -m roli.train` (roli/train.py) parses flags into a TrainConfig and calls run().
"""

from roli.config import ConfigError, StageSettings, TrainConfig
from roli.training.alp import ALPResult, adversarial_linear_probe
from roli.training.loop import Interrupted, NonFiniteLoss, Stage, fit
from roli.training.run import run

__all__ = [
    "ALPResult",
    "ConfigError",
    "Interrupted",
    "NonFiniteLoss",
    "Stage",
    "StageSettings",
    "TrainConfig",
    "adversarial_linear_probe",
    "fit",
    "run",
]
