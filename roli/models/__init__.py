"""Models: the pixel-space wrapper every attack and trainer in roli assumes."""

from roli.models.factory import build_model, load_into, load_state_dict_file
from roli.models.wrapper import IMAGENET_MEAN, IMAGENET_STD, NormalizedModel

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NormalizedModel", "build_model", "load_into", "load_state_dict_file"]
