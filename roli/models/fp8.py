"""FP8 linears for attacks: the attack's forward and input-gradient backward through float8 GEMMs.

While an attack runs, the parameters are frozen (roli.attacks._mode): every linear layer computes
y = x W^T + b forward and dx = dy W backward, and never a weight gradient. Both GEMMs run in float8 with
dynamic per-tensor scaling, as float8 training does it (torchao's float8 recipe: e4m3 for the forward's
operands, e5m2 for the output gradient): a tensor t is sent as t * s in float8 with s = fmax / amax(t), and the
GEMM (torch._scaled_mm: the FP8 tensor cores on sm89+) multiplies by 1 / s again after its float32
accumulation. On the CPU the same numbers are computed emulated: the float8 values (exact in float32) in a float32
GEMM, times the same factors (torch's CPU _scaled_mm is a reference kernel: 1.1 s for a 520x192x576 GEMM on a
2-core Xeon). Every other operation (attention's softmax, norms, activations, convs, the layers that are not
eligible) runs under bf16 autocast as in a bf16 attack.

The weights do not change during an attack, so each is cast once per attack call, not at each of its k
forward and backward passes: `FP8Linears(model).applied()` casts every eligible weight (row-major for the
forward, its transpose for the backward, one amax per weight) into buffers that keep their storage from call
to call (a CUDA graph recorded around the attack reads them by address; the casts run before its replay) and
swaps each eligible nn.Linear for an `FP8Linear` holding it, restoring the model on exit (also on error).
Eligible: a stock nn.Linear whose in and out features are multiples of 16 (what the FP8 tensor-core GEMM
needs), called from one place in the model, without hooks. A classifier head of 10 classes is not (it stays
bf16); the log says how many linears run in FP8 (`describe`).

Why not torchao's Float8Linear itself: it casts the weight at every forward (k times per attack) and its
backward computes the weight gradient too, a third GEMM an attack never needs. The tests compare this path
with torchao's emulated Float8Linear and with a float64 computation of the same scaling.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX, E5M2_MAX = torch.finfo(E4M3).max, torch.finfo(E5M2).max  # 448, 57344
MULTIPLE = 16  # the FP8 tensor-core GEMM's K and N must be multiples of 16
MIN_AMAX = 1e-12  # an all-zero tensor is scaled as if its largest value were this (its float8 copy is zero)


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether an attack on `device` can run its linears in float8 (and if not, why, in words). CUDA needs
    compute capability 8.9 or newer (Ada, Hopper: L40S, H100, H200; not A100); the CPU runs torch's own
    float8 numerics emulated (no speed-up: for tests and checks)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False, f"this torch ({torch.__version__}) has no float8 GEMM (torch._scaled_mm)"
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"float8 GEMMs run on CUDA GPUs of compute capability 8.9+ and the CPU, not on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, (f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores: they need 8.9+ "
                       "(L40S, H100, H200)")  # fmt: skip
    return True, ""


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t * s in `dtype`, 1 / s) with s = fmax / amax(t) as float32 device tensors: no host synchronisation."""
    fmax = E4M3_MAX if dtype == E4M3 else E5M2_MAX
    amax = t.detach().abs().amax().float().clamp(min=MIN_AMAX)
    scale = fmax / amax
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def scaled_mm(
    a8: torch.Tensor,
    b8: torch.Tensor,
    a_inv: torch.Tensor,
    b_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """(a8 @ b8) * a_inv * b_inv (+ bias) in bf16, a8 (M, K) row-major and b8 (K, N) column-major float8: the FP8
    GEMM on CUDA, emulated in float32 elsewhere."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8, scale_a=a_inv, scale_b=b_inv, bias=bias, out_dtype=torch.bfloat16,
                                use_fast_accum=fast_accum)  # fmt: skip
    with torch.autocast(a8.device.type, enabled=False):  # the attack runs under bf16 autocast: this GEMM is float32
        y = torch.mm(a8.float(), b8.float()) * (a_inv * b_inv)
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


class _Float8Linear(torch.autograd.Function):
    """y = x W^T + b with x cast to e4m3 here and W given cast (w8: (N, K) e4m3, w8t: its (K, N) transpose,
    w_inv: 1 / its scale); backward: dx = dy W with dy cast to e5m2. No gradient for W or b."""

    @staticmethod
    def forward(ctx, x, w8, w8t, w_inv, bias):
        shape = x.shape
        x8, x_inv = to_float8(x.reshape(-1, shape[-1]), E4M3)
        y = scaled_mm(x8, w8.t(), x_inv, w_inv, bias, fast_accum=True)
        ctx.save_for_backward(w8t, w_inv)
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        w8t, w_inv = ctx.saved_tensors
        g8, g_inv = to_float8(dy.reshape(-1, dy.shape[-1]), E5M2)
        dx = scaled_mm(g8, w8t.t(), g_inv, w_inv)
        return dx.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None, None


class FP8Linear(nn.Module):
    """An nn.Linear run through float8 GEMMs during an attack (input gradients only). Holds the linear (its
    parameters are shared, not copied) and the float8 casts of its weight, which `refresh()` recomputes in
    place."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        for name in ("w8", "w8t", "w_inv"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.register_buffer("bias16", torch.empty(0), persistent=False)

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the live weight (and bias, to bf16) into the buffers: in place where the shape and device are
        unchanged, so a compiled or graph-captured forward reads the same storage."""
        w = self.linear.weight
        w8, w_inv = to_float8(w, E4M3)
        w8t = w8.t().contiguous()  # the backward's right operand, column-major as _scaled_mm wants it
        b = self.linear.bias
        new = {"w8": w8, "w8t": w8t, "w_inv": w_inv, "bias16": b.to(torch.bfloat16) if b is not None else None}
        for name, value in new.items():
            old = getattr(self, name)
            if value is None:
                setattr(self, name, None)
            elif old is not None and old.shape == value.shape and old.device == value.device:
                old.copy_(value)
            else:
                setattr(self, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.linear.parameters()):
            raise RuntimeError("FP8Linear computes input gradients only (an attack's): its linear must be frozen")
        return _Float8Linear.apply(x, self.w8, self.w8t, self.w_inv, self.bias16)


def _eligible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.in_features % MULTIPLE == 0
        and module.out_features % MULTIPLE == 0
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not module._backward_hooks
    )


class FP8Linears:
    """The eligible linears of `model` (see the module docstring), found once; `applied()` swaps them in."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._active = False
        self._build()

    def _build(self) -> None:
        uses: dict[int, int] = {}
        for _, m in self.model.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        self.slots: list[tuple[nn.Module, str, FP8Linear]] = []
        self.skipped = 0
        for parent in self.model.modules():
            for name, child in parent._modules.items():
                if not isinstance(child, nn.Linear):
                    continue
                if _eligible(child) and uses[id(child)] == 1:
                    self.slots.append((parent, name, FP8Linear(child)))
                else:
                    self.skipped += 1

    def __len__(self) -> int:
        return len(self.slots)

    def describe(self) -> str:
        """What runs in FP8, in words for the log."""
        total = len(self.slots) + self.skipped
        return (f"{len(self.slots)} of {total} linear layers in FP8 (e4m3 forward, e5m2 gradients, weights cast "
                f"once per attack); the rest{' (' + str(self.skipped) + ')' if self.skipped else ''} in bf16: "
                f"features not multiples of {MULTIPLE}, hooks, or shared")  # fmt: skip

    def _current(self) -> bool:
        return all(parent._modules.get(name) is fp8.linear for parent, name, fp8 in self.slots)

    @contextlib.contextmanager
    def applied(self):
        """Cast the weights (once) and swap the FP8 linears in; put the nn.Linears back on exit."""
        if self._active:
            raise RuntimeError("these FP8Linears are already applied (nested use)")
        if not self._current():  # a linear was replaced since: look again
            self._build()
        for _, _, fp8 in self.slots:
            fp8.refresh()
        self._active = True
        try:
            for parent, name, fp8 in self.slots:
                parent._modules[name] = fp8
            yield self.model
        finally:
            for parent, name, fp8 in self.slots:
                parent._modules[name] = fp8.linear
            self._active = False
