"""Attacks and robust evaluation: PGD on the fused ops, eps-sweeps, AutoAttack (pyautoattack)."""

from roli.attacks._mode import attack_mode, unwrap
from roli.attacks.accuracy import robust_accuracy, robust_counts
from roli.attacks.autoattack import AutoAttackResult, run_autoattack
from roli.attacks.losses import ce_loss, dlr_loss
from roli.attacks.pgd import PGD, PGDConfig, PGDResult
from roli.attacks.sweep import clean_correct, eps_sweep

__all__ = [
    "PGD",
    "PGDConfig",
    "AutoAttackResult",
    "PGDResult",
    "attack_mode",
    "ce_loss",
    "clean_correct",
    "dlr_loss",
    "eps_sweep",
    "robust_accuracy",
    "robust_counts",
    "run_autoattack",
    "unwrap",
]
