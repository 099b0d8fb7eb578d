"""The one place for environment workarounds.

torchvision has no CPU-only build on some registries: with a CPU torch, `import torchvision` (and
therefore `import timm`) raises `RuntimeError: operator torchvision::nms does not exist` because its
compiled ops need libtorch_cuda. timm only needs torchvision's pure-Python parts. On exactly that error
we drop the half-imported torchvision submodules, declare the missing operator schemas (no kernels: any
call to them still fails loudly), and run torchvision's __init__ again.

`import roli` installs this as an import hook (install_torchvision_fix), so a user's `import timm` or
`import torchvision` after `import roli` works too; a working torchvision is imported untouched, and
nothing is imported before the user asks for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

import torch

ERROR = "torchvision::nms does not exist"
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


def _drop(packages: tuple[str, ...], keep_top: bool = False) -> None:
    """Forget the (half-)imported modules of these packages (their submodules only with keep_top)."""
    for name in [m for m in sys.modules if any(m.startswith(p + ".") or (m == p and not keep_top) for p in packages)]:
        del sys.modules[name]


class _RetryingLoader(importlib.abc.Loader):
    """torchvision's own loader; on exactly the missing-operator error, declare and execute once more."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        try:
            self.inner.exec_module(module)
        except RuntimeError as e:
            if ERROR not in str(e):
                raise
            _drop(("torchvision",), keep_top=True)
            _declare_torchvision_schemas()
            self.inner.exec_module(module)

    def __getattr__(self, name):  # resource readers, get_filename, ... of the real loader
        return getattr(self.inner, name)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the top-level `torchvision` the other finders find."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        others = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFinder)]
        for finder in others:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _RetryingLoader):
                    spec.loader = _RetryingLoader(spec.loader)
                return spec
        return None


def install_torchvision_fix() -> None:
    """Install the import hook once (called by `import roli`). A torchvision imported before it is left as
    it is."""
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def import_timm():
    """`import timm`, applying the torchvision workaround above only on its exact error (also where
    torchvision was imported, and failed, before the hook was installed)."""
    install_torchvision_fix()
    try:
        return importlib.import_module("timm")
    except RuntimeError as e:
        if ERROR not in str(e):
            raise
    _drop(("torchvision", "timm"))
    _declare_torchvision_schemas()
    return importlib.import_module("timm")
