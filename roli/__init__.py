"""roli: fast adversarially robust transfer learning (RoLI, Hua et al., CVPR 2024) in PyTorch."""

__version__ = "0.1.0"

from roli import ops  # noqa: E402

__all__ = ["ops", "__version__"]
