"""Which attention kernel runs inside roli's attack for timm's ViT and Swin (gpu_check.sh's sdpa stage).

One PGD step (forward + input-gradient backward, bf16 as the trainer's attack) of each model under torch.profiler:
the table names the attention modules' fused_attn flag (timm falls back to an explicit softmax(q k^T) v when it is
off), the scaled_dot_product_attention backend torch dispatched to (aten::_scaled_dot_product_flash_attention,
..._efficient_attention, ..._cudnn_attention, or the math fallback), forward and backward, and the attention
kernels' share of the step's device time (GPU: CUDA kernels whose names say flash/fmha/attention; CPU: the ops'
self time). Swin's shifted windows pass an additive mask, which the flash backend does not take: this says what
runs instead. Results: sdpa_kernels_<device>.md.

    python benchmarks/sdpa_kernels.py [--device cuda] [--models vitb,swinb]   (--models tiny: a CPU dry run)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import publish

from roli.attacks import PGD
from roli.models import create_classifier

RESULTS = Path(__file__).resolve().parent / "results"
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=None)
MODELS = {
    "vitb": lambda: create_classifier("vit_base_patch16_224", 10, **IMAGENET),
    "swinb": lambda: create_classifier("swin_base_patch4_window7_224", 10, **IMAGENET),
    "vit-tiny": lambda: create_classifier("vit_tiny_patch16_224", 10, img_size=32, patch_size=4, depth=2, **IMAGENET),
    "swin-tiny": lambda: create_classifier(
        "swin_tiny_patch4_window7_224",
        10,
        img_size=32,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=4,
        **IMAGENET,
    ),  # fmt: skip
}
SIZES = {"vitb": 224, "swinb": 224, "vit-tiny": 32, "swin-tiny": 32}
BACKENDS = ("flash", "efficient", "cudnn", "math", "overrideable")
KERNEL_WORDS = ("flash", "fmha", "attention", "attn")


def backend(op: str) -> str | None:
    """The SDPA backend an aten op name says, e.g. aten::_scaled_dot_product_flash_attention_backward -> flash."""
    if "scaled_dot_product" not in op:
        return None
    return next((b for b in BACKENDS if b in op), "dispatcher")


def step_ms(attack, x, y, device, reps: int = 5) -> float:
    """Median wall time of one attack call (after the warm-up), synchronised on a GPU."""
    import statistics
    import time

    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        attack(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def profile(name: str, device: torch.device, batch: int, force_fused: bool = False) -> dict:
    """One model's attention kernels; force_fused: timm's fused_attn switched on in every attention module (timm
    leaves it off for Swin's window attention: "experimental"), to see what would run and what it would cost."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device).eval()
    for m in model.modules():
        if force_fused and hasattr(m, "fused_attn"):
            m.fused_attn = True
    fused = sorted({str(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")})
    x = torch.rand(batch, 3, SIZES[name], SIZES[name], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    attack = PGD(model, eps=8 / 255, step_size=2 / 255, steps=1, keep="last", precision="bf16", seed=0)
    attack(x, y)  # warm-up: lazy initialisation, kernel selection
    ms = step_ms(attack, x, y, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        attack(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    ops = sorted({e.key for e in events if backend(e.key) and backend(e.key) != "dispatcher"})
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels) or 1.0
        attn = [e for e in kernels if any(w in e.key.lower() for w in KERNEL_WORDS)]
    else:  # the CPU: the sdpa ops' own time
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        attn = [e for e in events if backend(e.key)]
    time_of = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    share = sum(time_of(e) for e in attn) / total
    top = sorted(attn, key=time_of, reverse=True)[:3]
    return {
        "model": name + (" (fused_attn forced on)" if force_fused else ""),
        "ms": ms,
        "fused_attn": "/".join(fused) or "-",
        "backends": ", ".join(sorted({backend(op) for op in ops})) or "none (explicit softmax)",
        "ops": "; ".join(op.removeprefix("aten::") for op in ops) or "-",
        "share": share,
        "kernels": "; ".join(e.key[:60] for e in top) or "-",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="vitb,swinb", help="vitb, swinb; tiny: vit-tiny,swin-tiny (a dry run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    names = ["vit-tiny", "swin-tiny"] if args.models == "tiny" else [m for m in args.models.split(",") if m]
    rows = []
    for n in names:
        rows.append(profile(n, device, args.batch))
        if rows[-1]["fused_attn"] != "True":  # what timm's fused path would run instead, and its time
            rows.append(profile(n, device, args.batch, force_fused=True))
    cols = ["model", "fused_attn", "SDPA backend", "aten ops (forward, backward)", "attention share of the step",
            "top attention kernels", "PGD step ms (median of 5)"]  # fmt: skip

    def cells(r):
        return [r["model"], r["fused_attn"], r["backends"], r["ops"], f"{100 * r['share']:.1f}%", r["kernels"],
                f"{r['ms']:.1f}"]  # fmt: skip

    title = f"Attention kernels in one bf16 PGD step (batch {args.batch})"
    publish(args.out, "sdpa_kernels", title, {}, cols, cells, rows, device)


if __name__ == "__main__":
    main()
