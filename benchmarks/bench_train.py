"""Throughput of one adversarial training step, the whole step: attack + update.

Steps measured (batch 64): an adversarial finetuning step (PGD-7 + forward/backward/update of all
parameters) and an ALP step (PGD-7 + head update), on timm resnet18 at 32x32, a small ViT (vit_tiny,
patch 4 at 32x32) and roli's small CNN (3 channels, 32x32). Variants:
  ours fp32          what `python -m roli.train` runs: roli's PGD (Conv->BatchNorm folded for the attack,
                     input-only gradients, fused step) + the update with torch's fused AdamW, eager
  ours bf16          the same under bf16 autocast (channels_last attack images for conv nets)
  ours bf16+channels_last   and the conv net's weights in channels_last too (--channels-last)
  ours all fast (+compile)  bf16 + channels_last (conv nets) + torch.compile of the model (--compile)
  ours all fast (+CUDA graph)  on a GPU: bf16 + channels_last + the attack replayed from a CUDA graph
  reference-style    the RoLI reference code: .backward() on every parameter inside the attack, a
                     batch-level best iterate, one more forward with a graph, then the update
                     (torch.optim.AdamW as written there)
  torchattacks+loop  torchattacks.PGD + a plain PyTorch update (FT step only); "bf16": both under bf16
                     autocast (channels_last for conv nets), the best a peer gets in bf16
FLOP utilisation: FLOPs of one step (torch.utils.flop_counter, counted on the unfolded model) over the
time, relative to the matmul peak (2048x2048 on a CPU, 8192x8192 on a GPU; fp32 for fp32 variants, bf16
otherwise) timed as one more variant in the same round-robin, so under the same machine load.
Results: a Markdown table, CSV rows and a PNG bar chart in benchmarks/results/. Timing: two warm-up
rounds, then round-robin medians; on a GPU (--device cuda) with CUDA events.

    python benchmarks/bench_train.py [--quick] [--models resnet18,vit,cnn] [--device cpu|cuda] [--no-compile]

--settle (gpu_check.sh's perf stage): each round times 10 steps of every variant back to back, >= 3 rounds after
two warm-up rounds, and the table gives the median with the min-max spread over the rounds and the host
synchronisations one step makes (torch's sync debug mode: none expected); results as bench_perf_<device>.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    AutocastModel,
    host_syncs,
    matmul_load,
    optional_torchattacks,
    publish,
    reference_pgd,
    round_robin_spread,
)
from torch.utils.flop_counter import FlopCounterMode

from roli.attacks import PGD
from roli.features import alp_step, fast_layout
from roli.models import apply_peft, create_classifier
from roli.training.loop import ft_step, make_optimizer, param_groups

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), input_size=None)
MODELS = {
    "resnet18": lambda: create_classifier("resnet18", 10, **CIFAR),
    "vit": lambda: create_classifier("vit_tiny_patch16_224", 10, img_size=32, patch_size=4, **CIFAR),
    "cnn": lambda: create_classifier("roli.models.small:small_cnn", 10, in_chans=3, **CIFAR),
    # The paper's setting: ViT-B/16, CIFAR's 32x32 images resized to 224 inside the model (meant for a GPU).
    "vitb": lambda: create_classifier("vit_base_patch16_224", 10, **{**CIFAR, "input_size": 224}),
    # The paper's backbone (ARES-Swin-B's architecture) and a ResNet-50, at 224 likewise (--settle's models).
    "swinb": lambda: create_classifier("swin_base_patch4_window7_224", 10, **{**CIFAR, "input_size": 224}),
    "resnet50": lambda: create_classifier("resnet50", 10, **{**CIFAR, "input_size": 224}),
}
EPS, ALPHA, STEPS, BATCH = 8 / 255, 2 / 255, 7, 64


def plain_update(model, opt, x_adv, y, bf16: bool = False):
    model.train()
    with torch.autocast(x_adv.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x_adv)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def trainer_step(step, attack: PGD):
    """`step` as the trainer runs it: the attack's value checks deferred to a device flag that is collected
    after each step (the trainer reads it at its sync points, every few steps), never a host sync per call.
    `attack` is built with deferred=True, as roli.specs.AttackSpec.training builds the trainer's."""
    assert attack.config.deferred, "build the attack with deferred=True"
    flags = []

    def run():
        out = step()
        bad = attack.pop_invalid()
        if bad is not None:
            flags.append(bad)
            if len(flags) >= 16:  # the trainer's tally keeps one running flag; so does this
                flags[:] = [torch.stack(flags).any()]
        return out

    return run


def variants(name: str, use_compile: bool, device: torch.device) -> dict:
    """(step, label) -> (precision, step function) for FT and ALP steps, each on its own copy of the model.
    Ours is what `python -m roli.train` runs: roli's PGD (BatchNorm folded, input-only gradients, fused
    step) and the trainer's optimizer (torch's fused AdamW/SGD). The other two loops use torch.optim as
    people write it."""
    torchattacks = optional_torchattacks()
    torch.manual_seed(0)
    base = MODELS[name]().to(device)
    conv = any(isinstance(m, torch.nn.Conv2d) for m in base.backbone.modules()) and not name.startswith("vit")
    out = {}

    def ours_ft(label, precision, channels_last=False, compiled=False, graph=False):
        m = copy.deepcopy(base)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        net = torch.compile(m) if compiled else m
        layout = "channels_last" if channels_last else "auto"
        attack = PGD(
            net,
            eps=EPS,
            step_size=ALPHA,
            steps=STEPS,
            keep="last",
            precision=precision,
            seed=0,
            memory_format=layout,
            cuda_graph=graph,
            deferred=True,
        )
        opt = make_optimizer(param_groups(m, 0.0), "adamw", 1e-5, 0.9)
        out[("FT", label)] = (precision, trainer_step(lambda: ft_step(net, attack, opt, X, Y, precision), attack))

    ours_ft("ours fp32", "fp32")
    ours_ft("ours bf16", "bf16")
    if conv:
        ours_ft("ours bf16+channels_last", "bf16", channels_last=True)
    if use_compile:
        ours_ft("ours all fast (+compile)", "bf16", channels_last=conv, compiled=True)
    if device.type == "cuda":
        ours_ft("ours all fast (+CUDA graph)", "bf16", channels_last=conv, graph=True)
    ref = copy.deepcopy(base)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-5)

    def ref_ft():
        plain_update(ref, ref_opt, reference_pgd(ref, X, Y, EPS, ALPHA, STEPS), Y)

    out[("FT", "reference-style")] = ("fp32", ref_ft)
    if torchattacks is not None:
        ta = copy.deepcopy(base)
        ta_opt = torch.optim.AdamW(ta.parameters(), lr=1e-5)
        ta_atk = torchattacks.PGD(ta, eps=EPS, alpha=ALPHA, steps=STEPS)
        out[("FT", "torchattacks+loop")] = ("fp32", lambda: plain_update(ta, ta_opt, ta_atk(X, Y), Y))
        # The best a peer gets in bf16: torchattacks on the model under autocast, the update under autocast, and
        # channels_last for conv nets (model and images).
        tb = copy.deepcopy(base)
        x_peer = X.contiguous(memory_format=torch.channels_last) if conv else X
        if conv:
            tb.to(memory_format=torch.channels_last)
        tb_opt = torch.optim.AdamW(tb.parameters(), lr=1e-5)
        tb_atk = torchattacks.PGD(AutocastModel(tb), eps=EPS, alpha=ALPHA, steps=STEPS)
        out[("FT", "torchattacks+loop bf16")] = ("bf16", lambda: plain_update(tb, tb_opt, tb_atk(x_peer, Y), Y, True))
    for label, precision in (("ours fp32", "fp32"), ("ours bf16", "bf16")):
        m = copy.deepcopy(base)
        apply_peft(m, "linear")
        fast_layout(m, precision)  # what the trainer's ALP stage does: channels_last backbone under bf16
        attack = PGD(m, eps=EPS, step_size=ALPHA, steps=STEPS, keep="last", precision=precision, seed=0, deferred=True)
        opt = make_optimizer(param_groups(m.head, 0.0), "sgd", 0.01, 0.9)
        step = trainer_step(lambda m=m, a=attack, o=opt, p=precision: alp_step(m, a, o, X, Y, p), attack)
        out[("ALP", label)] = (precision, step)
    r = copy.deepcopy(base)
    apply_peft(r, "linear")
    r_opt = torch.optim.SGD(r.head.parameters(), lr=0.01, momentum=0.9)

    def ref_alp():
        best = reference_pgd(r, X, Y, EPS, ALPHA, STEPS, zero_grad=r_opt.zero_grad)
        plain_update(r, r_opt, best, Y)

    out[("ALP", "reference-style")] = ("fp32", ref_alp)
    return out


def step_flops(model, kind: str) -> int:
    """FLOPs of one step, counted from its parts (FlopCounterMode cannot follow autograd.grad):
    STEPS x (forward + input-only backward) + (FT: forward + full backward | ALP: one forward)."""
    flags = [p.requires_grad for p in model.parameters()]

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def attack_step():
        xi = X.clone().requires_grad_(True)
        F.cross_entropy(model(xi), Y).backward()

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        attack = count(attack_step)
        with torch.no_grad():
            forward = count(lambda: model(X))
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    if kind == "ALP":
        return STEPS * attack + forward
    update = count(lambda: F.cross_entropy(model(X), Y).backward())
    model.zero_grad(set_to_none=True)
    return STEPS * attack + update


def main() -> None:
    global X, Y
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--models", default="resnet18,vit,cnn")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA-event timing, and the CUDA-graph row)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--settle", action="store_true", help="10 steps per round, spread and host syncs: bench_perf")
    ap.add_argument("--steps", type=int, default=10, help="with --settle: timed steps per round (default 10)")
    ap.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="precisions to time (fp32 only on a CPU without native bf16: emulated bf16 is slow)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch has no CUDA device; use --device cpu")
    reps = 3 if args.quick else 5
    steps = max(1, args.steps) if args.settle else 1
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"--precisions: {args.precisions!r} must list fp32 and/or bf16")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    loads = {p: matmul_load(dtypes[p], device) for p in precisions}
    seen_peaks = {p: [] for p in precisions}
    torch.manual_seed(0)
    X, Y = torch.rand(BATCH, 3, 32, 32, device=device), torch.randint(0, 10, (BATCH,), device=device)
    rows = []
    for name in args.models.split(","):
        runs = {
            k: v
            for k, v in variants(name, use_compile=not args.no_compile, device=device).items()
            if v[0] in precisions
        }
        torch.manual_seed(0)
        probe = MODELS[name]().to(device).eval()
        flops = {"FT": step_flops(probe, "FT"), "ALP": step_flops(probe, "ALP")}
        # Two warm-up rounds (compilation, graph recording, allocator), then round-robin medians.
        # The matmul peak is timed as two more variants of the same rounds: the same machine load.
        timed_runs = {**{k: fn for k, (_, fn) in runs.items()}, **{("peak", p): f for p, (f, _) in loads.items()}}
        spread = round_robin_spread(timed_runs, reps, warmup=2, device=device, steps=steps)
        times = {k: v[0] for k, v in spread.items()}
        peaks = {p: loads[p][1] / times[("peak", p)] / 1e9 for p in loads}
        syncs = {k: host_syncs(fn, device) for k, fn in timed_runs.items() if k[0] != "peak"} if args.settle else {}
        for p in peaks:
            seen_peaks[p].append(peaks[p])
        for (kind, label), (precision, _) in runs.items():
            t, ref = times[(kind, label)], times[(kind, "reference-style")]
            rows.append(
                {
                    "model": name,
                    "step": kind,
                    "variant": label,
                    "seconds": t,
                    "steps_per_s": 1 / t,
                    "images_per_s": BATCH / t,
                    "vs_reference": ref / t,
                    "utilisation": flops[kind] / t / 1e9 / peaks[precision],
                    "precision": precision,
                    "gflop_per_step": flops[kind] / 1e9,
                    "peak_gflops": peaks[precision],
                    "steps_per_s_min": 1 / spread[(kind, label)][2],
                    "steps_per_s_max": 1 / spread[(kind, label)][1],
                    "host_syncs": syncs.get((kind, label)),
                }
            )
    cols = ["model", "step", "variant", "steps/s", "images/s", "vs reference-style", "FLOP utilisation"]
    if args.settle:
        cols[4:4] = ["steps/s min-max", "host syncs/step"]

    def cells(r):
        out = [
            r["model"],
            r["step"],
            r["variant"],
            f"{r['steps_per_s']:.2f}",
            f"{r['images_per_s']:.1f}",
            f"{r['vs_reference']:.2f}x",
            f"{100 * r['utilisation']:.0f}% ({r['precision']})",
        ]
        if args.settle:
            syncs = "-" if r["host_syncs"] is None else str(r["host_syncs"])
            out[4:4] = [f"{r['steps_per_s_min']:.2f}-{r['steps_per_s_max']:.2f}", syncs]
        return out

    name = "bench_perf" if args.settle else "bench_train"
    title = f"One adversarial training step (PGD-{STEPS}, batch {BATCH}, 32x32 input)"
    title += f", {reps} rounds of {steps} steps" if args.settle else ""
    title += " (the peak: interleaved with the steps, median over the models)"
    peaks = {p: statistics.median(v) for p, v in seen_peaks.items()}
    publish(args.out, name, title, peaks, cols, cells, rows, device)
    chart(rows, Path(args.out) / f"{name}_{device.type}.png")


def chart(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(m, s) for m in dict.fromkeys(r["model"] for r in rows) for s in ("FT", "ALP")]
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        vals = [
            next((r["vs_reference"] for r in rows if (r["model"], r["step"]) == g and r["variant"] == label), 0)
            for g in groups
        ]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{m}\n{s}" for m, s in groups])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("speed vs reference-style (x)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
