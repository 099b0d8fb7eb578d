"""Stage 1 of RoLI: the frozen-backbone feature cache, clean linear probing, adversarial linear probing."""

from roli.features.alp import ALPResult, adversarial_linear_probe, alp_step, robust_accuracy
from roli.features.cache import FeatureCache, Features, cache_key, compute_features
from roli.features.probe import ProbeResult, accuracy, train_linear_probe, train_linear_probes

__all__ = [
    "ALPResult",
    "FeatureCache",
    "Features",
    "ProbeResult",
    "accuracy",
    "adversarial_linear_probe",
    "alp_step",
    "cache_key",
    "compute_features",
    "robust_accuracy",
    "train_linear_probe",
    "train_linear_probes",
]
