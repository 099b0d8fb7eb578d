"""Build a classifier from a spec and load a state dict into it.

Specs: "package.module:function" (a factory returning an nn.Module; called with num_classes= when it
accepts it) or a timm model name (no weights are downloaded). The models issue extends this with the
published robust-checkpoint formats; here a checkpoint is a state dict (.pt/.pth/.bin via
torch.load(weights_only=True), or .safetensors), possibly nested under "state_dict" or "model".
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from roli._compat import import_timm
from roli.models.wrapper import NormalizedModel


def build_model(spec: str, num_classes: int) -> tuple[nn.Module, dict]:
    """Returns (network, config) where config may carry the timm mean/std/input_size."""
    if ":" in spec:
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import model factory {spec!r}: {e}") from None
        kwargs = {"num_classes": num_classes} if "num_classes" in inspect.signature(fn).parameters else {}
        net = fn(**kwargs)
        if not isinstance(net, nn.Module):
            raise ValueError(f"model factory {spec!r} returned {type(net).__name__}, not an nn.Module")
        return net, {}
    try:
        timm = import_timm()
    except ImportError:
        raise ValueError(f"unknown model {spec!r}: not 'module:function' and timm is not installed") from None
    if spec not in timm.list_models():
        raise ValueError(f"unknown model {spec!r}: not 'module:function' and not a timm model name")
    net = timm.create_model(spec, pretrained=False, num_classes=num_classes)
    cfg = net.pretrained_cfg or {}
    return net, {"mean": cfg.get("mean"), "std": cfg.get("std"), "input_size": cfg.get("input_size", [None])[-1]}


def load_state_dict_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError("loading .safetensors needs: pip install safetensors") from None
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt or non-tensor pickle
            raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict, source: str) -> None:
    """Strict load: missing or unexpected keys are an error that names them."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches are raised even with strict=False
        detail = " ".join(str(e).split())
        raise ValueError(f"checkpoint {source} does not match the model: {detail[:300]}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise ValueError(f"checkpoint {source} does not match the model: {'; '.join(problems)}")


def pixel_model(net: nn.Module, mean=None, std=None, input_size=None) -> NormalizedModel:
    return NormalizedModel(net, mean=mean, std=std, input_size=input_size)
