"""Mixed precision, shared by attacks, features and training (ground floor)."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on `device` (CPU or GPU) for precision "bf16", else a no-op context."""
    if precision == "bf16":
        # No cast cache while a CUDA graph records (the cached casts would not be in the graph's pool).
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=not capturing)
    return contextlib.nullcontext()
