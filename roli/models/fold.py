"""BatchNorm folding for attacks: every Conv -> BatchNorm pair of an eval-mode model run as one conv.

While an attack runs the model is in eval mode, so each BatchNorm is a per-channel affine map and the
conv before it can absorb it (w' = w * g / sqrt(v + e), b' = (b - m) * g / sqrt(v + e) + beta). Folding
drops the BatchNorm forward and backward from every attack step (on resnet18 at 32x32, about a tenth of
a PGD step on a 2-core Xeon, BENCHMARKS.md) and computes the same function up to float rounding.

How: `BatchNormFolding(model)` finds the pairs once, by torch.fx tracing (a module that does not trace
is searched child by child). `with folding.applied():` then swaps, in place, each pair's conv for a
`FoldedConvBN` (which holds the conv and the BatchNorm and shares their tensors) and the BatchNorm for
an identity, and puts the originals back on exit, also after an exception. The model's own forward
runs, so its Python code, its hooks and its methods behave as always. The folded weights are
recomputed from the live parameters on every entry: one elementwise pass over the conv weights per
attack, all pairs batched (refresh_folded: the per-channel vectors of every pair in a few multi-tensor
ops, then one multiply per conv). Always, because a change cannot be detected for free: a train-mode
BatchNorm updates its running statistics, and torch's fused optimizers its parameters, without bumping
their version counters.

A pair is folded only when the conv's output feeds nothing but the BatchNorm, the BatchNorm tracks
running statistics (otherwise eval mode normalises by the batch), each module is called once and
registered once, neither has hooks, and both are the stock torch.nn classes (a subclass with its own
forward, e.g. timm's BatchNormAct2d, is left as it is). Tracing runs the forward's Python code once with
symbolic values, when the pairs are first looked for.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FORWARDS = {c.forward for c in _CONVS}


class FoldedConvBN(nn.Module):
    """`bn(conv(x))` for an eval-mode BatchNorm, as one convolution whose weight and bias `refresh()`
    computes from the live parameters and statistics of `conv` and `bn` (shared, not copied)."""

    def __init__(self, conv: nn.Module, bn: _BatchNorm):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.register_buffer("bias", torch.empty(0), persistent=False)

    @torch.no_grad()
    def refresh(self, dtype: torch.dtype | None = None) -> None:
        """Recompute the folded weight and bias from the live tensors. dtype: store them in this dtype (e.g.
        bfloat16 for a bf16-autocast attack, which then casts no weight at any step); None keeps the conv
        weight's."""
        refresh_folded([self], dtype)

    def _storage(self, dtype: torch.dtype | None) -> None:
        """(Re)allocate the folded weight and bias where the conv weight's shape, layout, device or the wanted
        dtype changed; otherwise keep them, so a compiled or graph-captured forward reads the same storage."""
        w = self.conv.weight
        out_dtype = dtype or w.dtype
        if (self.weight.shape, self.weight.dtype, self.weight.stride(), self.weight.device) != (
            w.shape,
            out_dtype,
            w.stride(),
            w.device,
        ):
            self.weight = torch.empty_like(w, dtype=out_dtype)  # the conv weight's layout (channels_last stays)
            self.bias = torch.empty(w.shape[0], dtype=out_dtype, device=w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(x, self.weight, self.bias)


@torch.no_grad()
def refresh_folded(folded: list[FoldedConvBN], dtype: torch.dtype | None = None) -> None:
    """Fold every pair's live BatchNorm into its conv: w' = w * g / sqrt(v + e), b' = (b - m) * g / sqrt(v + e) +
    beta, in the conv weight's dtype promoted to at least float32, stored in `dtype` (None: the conv weight's).
    The per-channel vectors of all pairs are computed together in a few multi-tensor (foreach) ops, then one
    multiply per conv writes its folded weight in place: about N + 8 operations for N pairs instead of ~10 N
    (on a GPU each is a kernel launch, and this runs once per attack, i.e. per training step)."""
    if not folded:
        return
    for f in folded:
        f._storage(dtype)
    work = [torch.promote_types(f.conv.weight.dtype, torch.float32) for f in folded]
    bns = [f.bn for f in folded]
    scale = torch._foreach_add([bn.running_var.to(d) for bn, d in zip(bns, work, strict=True)], [bn.eps for bn in bns])
    torch._foreach_rsqrt_(scale)
    gamma = [(s, bn.weight.to(d)) for s, bn, d in zip(scale, bns, work, strict=True) if bn.weight is not None]
    if gamma:
        torch._foreach_mul_([s for s, _ in gamma], [g for _, g in gamma])
    bias = torch._foreach_mul([bn.running_mean.to(d) for bn, d in zip(bns, work, strict=True)], scale)
    torch._foreach_neg_(bias)
    beta = [(b, bn.bias.to(d)) for b, bn, d in zip(bias, bns, work, strict=True) if bn.bias is not None]
    if beta:
        torch._foreach_add_([b for b, _ in beta], [t for _, t in beta])
    conv_bias = [
        (b, f.conv.bias.to(d), s)
        for b, f, d, s in zip(bias, folded, work, scale, strict=True)
        if f.conv.bias is not None
    ]
    if conv_bias:
        torch._foreach_addcmul_(*(list(t) for t in zip(*conv_bias, strict=True)))
    for f, s, d in zip(folded, scale, work, strict=True):
        w = f.conv.weight
        torch.mul(w.to(d), s.view(-1, *([1] * (w.dim() - 1))), out=f.weight)  # in place, rounded once to its dtype
    torch._foreach_copy_([f.bias for f in folded], bias)


def _has_hooks(m: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, name, None) for name in names)


def _foldable(conv, bn) -> bool:
    return (
        isinstance(conv, _CONVS)
        and type(conv).forward in _CONV_FORWARDS
        and isinstance(bn, _BatchNorm)
        and type(bn).forward is _BatchNorm.forward
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
        and not _has_hooks(conv)
        and not _has_hooks(bn)
    )


def _has_pairs(module: nn.Module) -> bool:
    kinds = {type(m) for m in module.modules()}
    return any(issubclass(k, _CONVS) for k in kinds) and any(issubclass(k, _BatchNorm) for k in kinds)


def _slot(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of a submodule: where a swap writes."""
    parent, _, name = qualname.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def _get(slot: tuple[nn.Module, str]) -> nn.Module | None:
    return slot[0]._modules.get(slot[1])


def _put(slot: tuple[nn.Module, str], module: nn.Module) -> None:
    slot[0]._modules[slot[1]] = module


class _Pair(NamedTuple):
    conv_at: tuple[nn.Module, str]
    bn_at: tuple[nn.Module, str]
    folded: FoldedConvBN  # holds the conv and the BatchNorm themselves


def _pairs_traced(module: nn.Module) -> list | None:
    """[(conv slot, bn slot)] of `module` found by tracing, or None when it does not trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure means: search the children instead
        return None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        prev = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        if len(prev.args) != 1 or prev.kwargs or calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        if _foldable(module.get_submodule(prev.target), module.get_submodule(node.target)):
            pairs.append((_slot(module, prev.target), _slot(module, node.target)))
    return pairs


def _find_pairs(module: nn.Module) -> list:
    if not _has_pairs(module):
        return []
    pairs = _pairs_traced(module)
    if pairs is not None:
        return pairs
    return [p for child in module.children() for p in _find_pairs(child)]


class BatchNormFolding:
    """The Conv -> BatchNorm pairs of `model`, folded on demand (see the module docstring).

    Example:
        >>> folding = BatchNormFolding(model)
        >>> model.eval()
        >>> with folding.applied():
        ...     logits = model(x)  # the same function, without BatchNorm work
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._identity = nn.Identity()
        self._active = False
        self._build()

    def _build(self) -> None:
        paths = Counter(id(m) for _, m in self.model.named_modules(remove_duplicate=False))
        self.pairs = []
        for conv_at, bn_at in _find_pairs(self.model):
            conv, bn = _get(conv_at), _get(bn_at)
            if paths[id(conv)] == 1 and paths[id(bn)] == 1:
                self.pairs.append(_Pair(conv_at, bn_at, FoldedConvBN(conv, bn)))

    def __len__(self) -> int:
        return len(self.pairs)

    def _current(self) -> bool:
        return all(_get(p.conv_at) is p.folded.conv and _get(p.bn_at) is p.folded.bn for p in self.pairs)

    @contextlib.contextmanager
    def applied(self, dtype: torch.dtype | None = None):
        """Swap the folded convs in (refreshed from the live tensors) and the BatchNorms out; restore on exit.
        The model must be in eval mode (a training-mode BatchNorm normalises by the batch, which no
        conv can absorb). dtype: the folded weights' storage dtype (see FoldedConvBN.refresh)."""
        if self._active:
            raise RuntimeError("this BatchNormFolding is already applied (nested use)")
        if not self._current():  # a pair's module was replaced since: look again
            self._build()
        if any(p.folded.bn.training for p in self.pairs):
            raise RuntimeError("BatchNorm folding needs the model in eval mode (call model.eval() first)")
        refresh_folded([p.folded for p in self.pairs], dtype)
        self._active = True
        try:
            for p in self.pairs:
                _put(p.conv_at, p.folded)
                _put(p.bn_at, self._identity)
            yield self.model
        finally:
            for p in self.pairs:
                _put(p.conv_at, p.folded.conv)
                _put(p.bn_at, p.folded.bn)
            self._active = False
