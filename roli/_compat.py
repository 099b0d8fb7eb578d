"""The one place for environment workarounds.

torchvision has no CPU-only build on some registries: with a CPU torch, `import torchvision` (and
therefore `import timm`) raises `RuntimeError: operator torchvision::nms does not exist` because its
compiled ops need libtorch_cuda. timm only needs torchvision's pure-Python parts. On exactly that error
we drop the half-imported torchvision modules, declare the missing operator schemas (no kernels: any
call to them still fails loudly), and import again.
"""

from __future__ import annotations

import importlib
import sys

import torch

_MISSING_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_lib = None


def _declare_torchvision_schemas() -> None:
    global _lib
    if _lib is None:
        _lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _MISSING_OPS.values():
            try:
                _lib.define(schema)
            except RuntimeError:  # already defined
                pass


def import_timm():
    """`import timm`, applying the torchvision workaround above only on its exact error."""
    try:
        return importlib.import_module("timm")
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "timm"))]:
        del sys.modules[name]
    _declare_torchvision_schemas()
    return importlib.import_module("timm")
