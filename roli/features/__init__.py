"""Stage 1 of RoLI: the frozen-backbone feature cache, clean linear probing, the adversarial linear probing
step (its epoch loop is the trainer's: roli.training.adversarial_linear_probe)."""

from roli.features.alp_step import alp_step, fast_layout
from roli.features.cache import FeatureCache, Features, cache_key, compute_features
from roli.features.probe import ProbeResult, accuracy, train_linear_probe, train_linear_probes

__all__ = [
    "FeatureCache",
    "Features",
    "ProbeResult",
    "accuracy",
    "alp_step",
    "cache_key",
    "compute_features",
    "fast_layout",
    "train_linear_probe",
    "train_linear_probes",
]
