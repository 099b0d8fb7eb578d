"""RobustClassifier: a backbone (any timm model or a user's nn.Module) plus a linear head, in pixel space.

    forward(x) = head(features(x)),  features(x) = backbone(normalize(resize(x)))   (pre-logits, (B, D))

The head is a plain nn.Linear(D, num_classes): the object adversarial linear probing trains and RoLI
initialises finetuning from. A backbone is used through the timm protocol when it has it
(reset_classifier(0) removes its own classifier, num_features gives D); any other module is taken as
a feature extractor returning (B, D) and D is found by one forward pass.
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch
from torch import nn

from roli._compat import import_timm
from roli._io import first_line
from roli.models import registry
from roli.models.registry import HUB_PREFIXES
from roli.models.wrapper import Preprocess


class RobustClassifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        num_classes: int,
        mean=None,
        std=None,
        input_size=None,
        name: str = "custom",
        classifier_key: str | None = None,
        interpolation: str = "bilinear",
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.pre = Preprocess(mean, std, input_size, interpolation)
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes)
        self.name, self.classifier_key = name, classifier_key
        self.feat_dim, self.num_classes = feat_dim, num_classes
        # What train() does to the backbone, set by apply_peft as the reference code runs each method: "train"
        # (full finetuning: drop-path, dropout), "eval" (linear, LoRA, Adapter, Bias: the reference's froze_enc,
        # BatchNorm statistics fixed, no drop-path, no LoRA dropout), "prompts" (VPT: eval but prompt dropout).
        self.encoder_mode = "train"

    @property
    def mean(self):
        return self.pre.mean

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits (B, D) of images in [0, 1]."""
        return self.backbone(self.pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.encoder_mode != "train":
            self.backbone.eval()
            if self.encoder_mode == "prompts":  # VPT: only the prompts' dropout draws
                for m in self.backbone.modules():
                    if isinstance(getattr(m, "prompt_dropout", None), nn.Module):
                        m.prompt_dropout.train()
        return self

    def reset_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.feat_dim, num_classes).to(self.head.weight.device)
        self.num_classes = num_classes


HEAD_INITS = ("reference", "torch", "zero")
PRIOR = 0.01  # the reference head's initial class probability


@torch.no_grad()
def init_head(head: nn.Linear, kind: str) -> None:
    """Initialise a classifier head in place.

    - "reference": the RoLI reference's head (src/models/mlp.py with special_bias): kaiming_normal_ with
      mode="fan_out" (std sqrt(2 / num_classes)) and every bias -log((1 - p) / p) with p = 0.01 (about -4.595),
      the focal-loss prior init. Its RanLI baseline and its ALP start from this head.
    - "torch": nn.Linear's own (kaiming_uniform_ with a = sqrt(5), bias uniform in +-1/sqrt(fan_in)).
    - "zero": weight and bias 0 (every class equal: the logits start constant).
    """
    if kind == "reference":
        nn.init.kaiming_normal_(head.weight, mode="fan_out")
        head.bias.fill_(-math.log((1 - PRIOR) / PRIOR))
    elif kind == "torch":
        head.reset_parameters()
    elif kind == "zero":
        head.weight.zero_()
        head.bias.zero_()
    else:
        raise ValueError(f"head init {kind!r} is not one of {', '.join(HEAD_INITS)}")


def _timm_cfg(net: nn.Module) -> dict:
    return dict(getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None) or {})


def _classifier_name(net: nn.Module) -> str | None:
    """The attribute path of a timm-style model's classifier (e.g. "fc", "head", "head.fc")."""
    if not hasattr(net, "get_classifier"):
        return None
    clf = net.get_classifier()
    return next((name for name, mod in net.named_modules() if mod is clf and name), None)


def _factory(spec: str):
    """The function or class a "package.module:function" spec names. Importing and calling it runs code, as
    any module:function configuration does; anything that is not a Python function or class (a builtin
    such as os:system) is refused."""
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import model factory {spec!r}: {e}") from None
    if not (inspect.isfunction(fn) or inspect.isclass(fn)):
        raise ValueError(
            f"model factory {spec!r} is a {type(fn).__name__}, not a Python function or class that builds an nn.Module"
        )
    return fn


def _build_net(model: str | nn.Module, in_chans: int, pretrained: bool, model_kwargs: dict) -> nn.Module:
    """The backbone: the module itself, a "package.module:function" factory's, or timm's (no classifier)."""
    if isinstance(model, nn.Module):
        return model
    elif ":" in model and not model.startswith(HUB_PREFIXES):
        fn = _factory(model)
        try:
            takes_chans = "in_chans" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_chans = False
        if takes_chans and "in_chans" not in model_kwargs:
            model_kwargs = {**model_kwargs, "in_chans": in_chans}
        net = fn(**model_kwargs)
        if not isinstance(net, nn.Module):
            raise ValueError(f"model factory {model!r} returned {type(net).__name__}, not an nn.Module")
        return net
    try:
        timm = import_timm()
    except ImportError:
        raise ValueError(f"unknown model {model!r}: not 'module:function' and timm is not installed") from None
    hub = model.startswith(HUB_PREFIXES)
    if not hub and model not in timm.list_models():
        raise ValueError(f"unknown model {model!r}: not 'module:function' and not a timm model name")
    if not (pretrained or hub):
        return timm.create_model(model, num_classes=0, in_chans=in_chans, **model_kwargs)
    with _hub_access(model) as online:
        try:
            return timm.create_model(model, pretrained=pretrained, num_classes=0, in_chans=in_chans, **model_kwargs)
        except Exception as e:  # noqa: BLE001 - the hub's and torch.hub's many errors: one line
            what = "is not reachable (offline, or HF_HUB_OFFLINE)" if not online else f"failed ({first_line(e)})"
            raise ValueError(
                f"{model}: timm's weights are not in the local cache and the Hugging Face hub {what}; fetch a "
                "checkpoint where a network is and give --checkpoint FILE (load_pretrained in Python)"
            ) from None


HUB_HOST = ("huggingface.co", 443)


def hub_online() -> bool:
    """Whether timm's weights can be fetched: HF_HUB_OFFLINE unset and the hub's host reachable (one quick
    connection, so an offline machine fails in seconds, not after a minute of retries)."""
    from roli import _env

    return not _env.hub_offline() and _env.reachable(*HUB_HOST)


class _hub_access:
    """Around timm's download: offline (no host, or HF_HUB_OFFLINE), the Hugging Face hub is switched to its local
    cache for the call (a cached file still loads; a missing one fails at once, without retries). Yields
    whether the hub is online."""

    def __init__(self, model: str):
        self.model, self.saved = model, None

    def __enter__(self) -> bool:
        self.online = hub_online()
        if not self.online:
            try:
                from huggingface_hub import constants
            except ImportError:
                return False
            self.saved = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = True
        return self.online

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = self.saved


def create_classifier(
    model: str | nn.Module,
    num_classes: int,
    *,
    mean="auto",
    std="auto",
    input_size="auto",
    interpolation: str = "bilinear",
    feat_dim: int | None = None,
    in_chans: int = 3,
    pretrained: bool = False,
    **model_kwargs,
) -> RobustClassifier:
    """Build a RobustClassifier.

    Args:
        model: a name of the registry of published robust backbones (roli.models.registry, e.g. "ares_swin_b":
            the publisher's architecture, mean/std and input size), a timm model name (created without
            weights: load robust weights with roli.models.load_pretrained), "package.module:function" (a
            factory returning an nn.Module, called with **model_kwargs), or an nn.Module.
        num_classes: classes of the new linear head.
        mean, std, input_size: preprocessing inside the model; "auto" takes them from the registry entry,
            else the timm config (input_size: its native resolution) or, for other modules, none; None
            disables each.
        interpolation: of the resize inside the model (to input_size): "bilinear" (the reference's
            protocol for CIFAR) or "bicubic".
        feat_dim: the feature dimension of a non-timm module (default: found by one forward pass).
        in_chans: image channels (for timm models and the feature-dimension probe).
        pretrained: for timm names, download timm's (standard, non-robust) weights; needs a reachable hub.
            Robust checkpoints are loaded with load_pretrained.
        model_kwargs: passed to timm.create_model or the factory (e.g. img_size=32 for a ViT).
    """
    name = model if isinstance(model, str) else type(model).__name__
    entry = registry.lookup(model)
    if entry is not None:  # a published backbone: its architecture and the publisher's preprocessing
        name, model = entry.name, entry.arch
        model_kwargs = {**entry.arch_args, **model_kwargs}
        if mean == "auto":
            mean, std = entry.mean, entry.std
        if input_size == "auto" and "img_size" not in model_kwargs:
            input_size = (entry.input_size, entry.input_size)
    for key, value in (("mean", mean), ("std", std)):
        if value not in ("auto", None) and (
            isinstance(value, (str, bytes))
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(f"{key} must be a sequence of numbers, one per channel; got {value!r}")
    net = _build_net(model, in_chans, pretrained, model_kwargs)
    cfg = _timm_cfg(net)
    classifier_key = cfg.get("classifier") or _classifier_name(net)
    if hasattr(net, "reset_classifier") and hasattr(net, "num_features"):
        net.reset_classifier(0)
        feat_dim = feat_dim or int(net.num_features)
    if mean == "auto":
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is not None and len(mean) != in_chans:
            mean, std = None, None
    if input_size == "auto":
        native = cfg.get("input_size")
        input_size = tuple(native[-2:]) if native and "img_size" not in model_kwargs else None
    if isinstance(input_size, int):  # --input-size N: N x N (the probe below needs both sides)
        input_size = (input_size, input_size)
    if feat_dim is None:
        probe = torch.zeros(2, in_chans, *(input_size or (32, 32)))
        was_training = net.training
        with torch.no_grad():
            out = net.eval()(probe)
        net.train(was_training)
        if out.dim() != 2:
            raise ValueError(f"{name} returns shape {tuple(out.shape)}; a feature extractor must return (B, D)")
        feat_dim = out.shape[1]
    out = RobustClassifier(net, feat_dim, num_classes, mean, std, input_size, name, classifier_key, interpolation)
    out.published = entry  # the registry entry (preprocessing facts, layout), or None
    return out
