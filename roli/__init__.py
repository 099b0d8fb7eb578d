"""roli: fast adversarially robust transfer learning (RoLI, Hua et al., CVPR 2024) in PyTorch."""

__version__ = "0.1.0"

from roli._compat import install_torchvision_fix  # noqa: E402

install_torchvision_fix()  # `import timm` / `import torchvision` work after `import roli` (see roli._compat)

from roli import ops  # noqa: E402

__all__ = ["ops", "__version__"]
