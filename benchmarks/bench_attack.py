"""Throughput of PGD-10 (images/s), FLOP utilisation, and the robust accuracy each attack reaches.

Attacks, all PGD-10 with a random start on the same model and batch, parameters requiring grad (as
inside a training loop):
  ours fp32    roli.attacks.PGD (input-only gradients, frozen parameters, fused step), keep="last"
  ours bf16    the same under bf16 autocast
  torchattacks torchattacks.PGD
  reference    the RoLI reference code's attack: .backward() on every parameter at every step, the best
               iterate chosen per batch by the mean loss, and one more forward with a graph at the end
Models: timm resnet18 at 32x32 (CIFAR-sized input) and vit_tiny_patch16_224 at 224, random weights;
labels are the model's own clean predictions, so clean accuracy is 100% and the robust accuracy
measures the attack. FLOPs per PGD-10 come from torch.utils.flop_counter (forward + input backward,
10 steps); utilisation is over a matmul peak measured in the same run, fp32 or bf16 as the variant.

    python benchmarks/bench_attack.py            # both models
    python benchmarks/bench_attack.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    NO_TORCHATTACKS,
    AutocastModel,
    matmul_peak,
    optional_torchattacks,
    publish,
    ratio,
    reference_pgd,
    round_robin,
)
from torch.utils.flop_counter import FlopCounterMode

from roli._amp import autocast_for
from roli._compat import import_timm
from roli.attacks import PGD
from roli.models import NormalizedModel

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# (timm name, input size, batch, eps): the budgets put these random-weight models between "all robust"
# and "all broken", so robust accuracy compares attack strength (throughput does not depend on eps).
MODELS = [
    ("resnet18", 32, 128, 1 / 255),
    ("vit_tiny_patch16_224", 224, 16, 0.25 / 255),
    ("vit_base_patch16_224", 224, 64, 0.25 / 255),
]  # ViT-B/16 at batch 64: the paper's size (GPU)
DEFAULT_MODELS = "resnet18,vit_tiny_patch16_224"


def make_variants(model, x, y, eps, alpha, steps, torchattacks) -> dict:
    """label -> (precision, a function running that attack on (x, y))."""

    def ours(precision):
        return lambda: PGD(model, eps=eps, step_size=alpha, steps=steps, keep="last", precision=precision)(x, y)

    out = {"ours fp32": ("fp32", ours("fp32")), "ours bf16": ("bf16", ours("bf16"))}
    if torchattacks is not None:
        # The peer in bf16: torchattacks on the model under autocast, with channels_last images for conv nets.
        peer = AutocastModel(model)
        conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        x_peer = x.contiguous(memory_format=torch.channels_last) if conv else x
        out["torchattacks"] = ("fp32", lambda: torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)(x, y))
        out["torchattacks bf16 (autocast)"] = (
            "bf16",
            lambda: torchattacks.PGD(peer, eps=eps, alpha=alpha, steps=steps)(x_peer, y),
        )
    out["reference-style"] = ("fp32", lambda: reference_pgd(model, x, y, eps, alpha, steps))
    return out


def pgd_flops(model, x, y, steps, precision) -> int:
    """FLOPs of `steps` attack steps: forward + backward to the input only (what our attack computes)."""
    xi = x.clone().requires_grad_(True)
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            with autocast_for(x.device, precision):
                loss = F.cross_entropy(model(xi).float(), y)
            loss.backward()  # parameters frozen: the input gradient only
    finally:
        for p, flag in zip(model.parameters(), params, strict=True):
            p.requires_grad_(flag)
    return counter.get_total_flops() * steps


def robust_accuracy(model, x_adv, y) -> float:
    with torch.no_grad():
        return float((model.eval()(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--eps", type=float, help="budget for every model (default: per model, see MODELS)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help="comma list of the models above (vit_base_patch16_224 at batch 64 is meant for a GPU)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA-event timing)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torchattacks = optional_torchattacks()

    timm = import_timm()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch has no CUDA device; use --device cpu")
    reps = 2 if args.quick else 5
    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    rows = []
    for name, size, batch, model_eps in MODELS:
        if name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        model = NormalizedModel(timm.create_model(name, pretrained=False, num_classes=10), CIFAR_MEAN, CIFAR_STD)
        model = model.to(device).eval()
        x = torch.rand(batch, 3, size, size, device=device)
        with torch.no_grad():
            y = model(x).argmax(1)
        eps = args.eps if args.eps is not None else model_eps
        alpha = eps / 4
        variants = make_variants(model, x, y, eps, alpha, args.steps, torchattacks)
        flops = {p: pgd_flops(model, x, y, args.steps, p) for p in ("fp32", "bf16")}
        checked = {}
        for label, (_, run) in variants.items():  # correctness and strength first
            torch.manual_seed(1)
            x_adv = run()
            assert float((x_adv - x).abs().max()) <= eps + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
            assert all(p.requires_grad for p in model.parameters()), f"{label} left parameters frozen"
            checked[label] = robust_accuracy(model, x_adv, y)
        times = round_robin({label: run for label, (_, run) in variants.items()}, reps, device=device)
        base = times.get("torchattacks")
        for label, (precision, _) in variants.items():
            t = times[label]
            util = flops[precision] / t / 1e9 / peaks[precision]
            row = {"model": f"{name} @{size}", "eps": f"{eps * 255:.3g}/255", "batch": batch, "attack": label}
            row.update(
                seconds=t,
                images_per_s=batch / t,
                robust_acc=checked[label],
                gflops=flops[precision] / 1e9,
                utilisation=util,
                precision=precision,
                vs_torchattacks=base / t if base else None,
                vs_reference=times["reference-style"] / t,
            )
            rows.append(row)
    end_peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    for r in rows:  # utilisation against the best peak seen at the start or the end of the run
        peak = max(peaks[r["precision"]], end_peaks[r["precision"]])
        r["utilisation"] = r["gflops"] / r["seconds"] / peak
    peaks = {k: max(peaks[k], end_peaks[k]) for k in peaks}
    cols = [
        "model",
        "eps",
        "batch",
        "attack",
        "images/s",
        "vs torchattacks",
        "vs reference-style",
        "robust acc",
        "GFLOP per PGD",
        "FLOP utilisation",
    ]

    def cells(r):
        return [r["model"], r["eps"], str(r["batch"]), r["attack"], f"{r['images_per_s']:.1f}",
                ratio(r["vs_torchattacks"]), f"{r['vs_reference']:.2f}x", f"{100 * r['robust_acc']:.1f}%",
                f"{r['gflops']:.1f}", f"{100 * r['utilisation']:.0f}% ({r['precision']})"]  # fmt: skip

    title = f"PGD-{args.steps} (Linf, step eps/4, random start)"
    if torchattacks is None:
        title += f" ({NO_TORCHATTACKS})"
    publish(args.out, "bench_attack", title, peaks, cols, cells, rows, device)


if __name__ == "__main__":
    main()
