"""Models: backbones with a linear head in pixel space, robust checkpoints, PEFT methods."""

from roli.models.checkpoint import LoadReport, load_checkpoint, load_pretrained, read_state_dict, save_checkpoint
from roli.models.classifier import HEAD_INITS, RobustClassifier, create_classifier, init_head
from roli.models.fold import BatchNormFolding, FoldedConvBN
from roli.models.peft import METHODS as PEFT_METHODS
from roli.models.peft import apply_peft, count_trainable, inert_parameters, merge_lora, what_trains
from roli.models.registry import REGISTRY, Published, resolve_checkpoint
from roli.models.wrapper import IMAGENET_MEAN, IMAGENET_STD, NormalizedModel, Preprocess

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PEFT_METHODS",
    "REGISTRY",
    "BatchNormFolding",
    "FoldedConvBN",
    "HEAD_INITS",
    "LoadReport",
    "NormalizedModel",
    "Preprocess",
    "Published",
    "RobustClassifier",
    "apply_peft",
    "count_trainable",
    "create_classifier",
    "inert_parameters",
    "init_head",
    "load_checkpoint",
    "load_pretrained",
    "merge_lora",
    "read_state_dict",
    "resolve_checkpoint",
    "save_checkpoint",
    "what_trains",
]
