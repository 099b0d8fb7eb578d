"""Mixed precision, shared by attacks, features and training (ground floor)."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
# An attack's precisions: those, and fp8 (its linears' GEMMs in float8, roli.models.fp8; the rest in bf16).
ATTACK_PRECISIONS = (*PRECISIONS, "fp8")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}

# fp16 attacks: the loss is multiplied by this before the input-gradient backward, so that small gradients do not
# flush to zero in float16 (the sign a Linf step takes, and the direction an L2 step takes, do not change under a
# positive factor). A fixed factor, well below GradScaler's starting 2**16: attack losses are per-example sums.
FP16_ATTACK_SCALE = 1024.0


def autocast_for(device: torch.device, precision: str):
    """bf16 or fp16 autocast on `device` (CPU or GPU) for precision "bf16" / "fp16" (an fp8 attack: bf16 around its
    float8 linears), else a no-op context."""
    if precision in DTYPES:
        # No cast cache while a CUDA graph records (the cached casts would not be in the graph's pool).
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(device_type=device.type, dtype=DTYPES[precision], cache_enabled=not capturing)
    return contextlib.nullcontext()


def attack_loss_scale(precision: str) -> float:
    """The factor of the attack's loss before its input-gradient backward (1 but in fp16)."""
    return FP16_ATTACK_SCALE if precision == "fp16" else 1.0


def grad_scaler(precision: str, device) -> torch.amp.GradScaler | None:
    """fp16 updates: torch's GradScaler (dynamic loss scaling; a step with inf/NaN gradients is skipped and the
    scale lowered); None in fp32 and bf16, which need none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
