"""roli: fast adversarially robust transfer learning (RoLI, Hua et al., CVPR 2024) in PyTorch.

The public API, importable from `roli` directly (each name is imported on first use, so `import roli`
stays light):

    backbones   create_classifier, load_pretrained, load_checkpoint, save_checkpoint, REGISTRY
    PEFT        apply_peft, merge_lora
    data        load_dataset
    attacks     PGD, robust_accuracy, eps_sweep, clean_correct, run_autoattack (all take (model, data, ...))
    training    adversarial_linear_probe (ALP), fit and Stage (the epoch loop), TrainConfig and run (a whole
                `roli train` run from Python)
    kernels     roli.ops (pgd_init, pgd_step_, keep_best_)
"""

__version__ = "0.1.0"

from roli._compat import install_torchvision_fix  # noqa: E402

install_torchvision_fix()  # `import timm` / `import torchvision` work after `import roli` (see roli._compat)

from roli import ops  # noqa: E402

_API = {
    "create_classifier": "roli.models",
    "load_pretrained": "roli.models",
    "load_checkpoint": "roli.models",
    "save_checkpoint": "roli.models",
    "REGISTRY": "roli.models",
    "apply_peft": "roli.models",
    "merge_lora": "roli.models",
    "load_dataset": "roli.data",
    "PGD": "roli.attacks",
    "robust_accuracy": "roli.attacks",
    "eps_sweep": "roli.attacks",
    "clean_correct": "roli.attacks",
    "run_autoattack": "roli.attacks",
    "adversarial_linear_probe": "roli.training",
    "fit": "roli.training",
    "Stage": "roli.training",
    "TrainConfig": "roli.training",
    "run": "roli.training",
}

__all__ = ["ops", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'roli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
