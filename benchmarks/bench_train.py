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
from roli.models.fp8 import fp8_supported
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


def variants(name: str, use_compile: bool, device: torch.device, fp8: bool = False) -> dict:
    """(step, label) -> (precision, step function) for FT and ALP steps, each on its own copy of the model.
    Ours is what `python -m roli.train` runs: roli's PGD (BatchNorm folded, input-only gradients, fused
    step) and the trainer's optimizer (torch's fused AdamW/SGD). The other two loops use torch.optim as
    people write it."""
    torchattacks = optional_torchattacks()
    torch.manual_seed(0)
    base = MODELS[name]().to(device)
    conv = any(isinstance(m, torch.nn.Conv2d) for m in base.backbone.modules()) and not name.startswith("vit")
    out = {}

    def ours_ft(label, precision, channels_last=False, compiled=False, graph=False, attack_precision=None):
        m = copy.deepcopy(base)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        # compiled: True (inductor's default mode: --compile) or "reduce-overhead" (inductor's own CUDA graphs)
        net = m if not compiled else torch.compile(m, mode=None if compiled is True else compiled)
        layout = "channels_last" if channels_last else "auto"
        attack = PGD(
            net,
            eps=EPS,
            step_size=ALPHA,
            steps=STEPS,
            keep="last",
            precision=attack_precision or precision,
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
        if use_compile:  # item 2 of the GPU issue: which CUDA graph wins around compiled passes
            ours_ft("ours all fast (+compile +CUDA graph)", "bf16", channels_last=conv, compiled=True, graph=True)
            ours_ft("ours all fast (+compile reduce-overhead)", "bf16", channels_last=conv, compiled="reduce-overhead")
    if (
        fp8 and not conv
    ):  # the attack's linears in float8, the update bf16 (--attack-precision fp8); a conv net has none
        label = (
            "ours all fast (+CUDA graph, fp8 attack)" if device.type == "cuda" else "ours bf16 (fp8 attack, emulated)"
        )
        ours_ft(label, "bf16", graph=device.type == "cuda", attack_precision="fp8")
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


LARGEST = "ours all fast (+CUDA graph)"  # the variant --largest-batch compares with torchattacks + loop bf16


def measure(name, label, args, device, fp8, loads, precisions, reps, steps, keep=None) -> tuple[list[dict], dict]:
    """Rows of every variant of model `name` at the current X, Y (labelled `label`), and the run's matmul peaks."""
    runs = {
        k: v
        for k, v in variants(name, use_compile=not args.no_compile, device=device, fp8=fp8).items()
        if v[0] in precisions and (keep is None or keep(k))
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
    rows = []
    for (kind, variant), (precision, _) in runs.items():
        t = times[(kind, variant)]
        ref, peer = times.get((kind, "reference-style")), times.get((kind, "torchattacks+loop bf16"))
        rows.append(
            {
                "model": label,
                "step": kind,
                "variant": variant,
                "seconds": t,
                "steps_per_s": 1 / t,
                "images_per_s": len(Y) / t,
                "vs_reference": ref / t if ref else None,
                "vs_peer_bf16": peer / t if peer else None,
                "utilisation": flops[kind] / t / 1e9 / peaks[precision],
                "precision": precision,
                "gflop_per_step": flops[kind] / 1e9,
                "peak_gflops": peaks[precision],
                "steps_per_s_min": 1 / spread[(kind, variant)][2],
                "steps_per_s_max": 1 / spread[(kind, variant)][1],
                "host_syncs": syncs.get((kind, variant)),
            }
        )
    return rows, peaks


def largest_batch(name: str, candidates: list[int], device) -> int | None:
    """The largest of `candidates` (tried in order, stopping at the first that does not fit) at which two FT steps
    of `name` (ours + CUDA graph, bf16) and of torchattacks + loop bf16 run without running out of memory."""
    global X, Y
    best = None
    for batch in candidates:
        X, Y = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
        try:
            runs = variants(name, use_compile=False, device=device)
            for key in (("FT", LARGEST), ("FT", "ours bf16"), ("FT", "torchattacks+loop bf16")):
                if key in runs:
                    runs[key][1]()
                    runs[key][1]()
            best = batch
        except torch.OutOfMemoryError:
            break
        finally:
            runs = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


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
    ap.add_argument("--fp8", choices=["auto", "on", "off"], default="auto",
                    help="the fp8-attack row (auto: on a GPU with FP8 GEMMs, compute capability 8.9+)")  # fmt: skip
    ap.add_argument("--largest-batch", metavar="MODEL", help="with --settle: MODEL's FT step also at the largest "
                    "batch of --batches that fits (ours + CUDA graph vs torchattacks + loop bf16)")  # fmt: skip
    ap.add_argument("--batches", default="128,256,512,1024", help="--largest-batch's candidates, tried in order")
    ap.add_argument("--compile-only", action="store_true", help="the FT step's compile rows, the eager CUDA-graph "
                    "row and torchattacks + loop bf16 only (gpu_check.sh's compile stage)")  # fmt: skip
    ap.add_argument("--name", help="the results' file name (default: bench_perf with --settle, else bench_train)")
    args = ap.parse_args()
    device = torch.device(args.device)
    fp8 = args.fp8 == "on" or (args.fp8 == "auto" and device.type == "cuda" and fp8_supported(device)[0])
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
        keep = None
        if args.compile_only:  # the compile rows beside the eager CUDA-graph row and the peer
            keep = lambda k: k[0] == "FT" and ("compile" in k[1] or k[1] in (LARGEST, "torchattacks+loop bf16"))  # noqa: E731
        found = measure(name, name, args, device, fp8 and not args.compile_only, loads, precisions, reps, steps, keep)
        rows += found[0]
        for p, v in found[1].items():
            seen_peaks[p].append(v)
    if args.settle and args.largest_batch:
        batch = largest_batch(args.largest_batch, [int(b) for b in args.batches.split(",") if b], device)
        if batch:
            X, Y = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
            ours = LARGEST if device.type == "cuda" else "ours bf16"  # the CUDA graph needs a GPU
            keep = {("FT", ours), ("FT", "torchattacks+loop bf16")}.__contains__
            label = f"{args.largest_batch} @batch {batch}"
            rows += measure(args.largest_batch, label, args, device, False, loads, precisions, reps, steps, keep)[0]
    cols = ["model", "step", "variant", "steps/s", "images/s", "vs reference-style", "FLOP utilisation"]
    if args.settle:
        cols[4:4] = ["steps/s min-max", "host syncs/step"]
        cols[-1:-1] = ["vs torchattacks+loop bf16"]

    def ratio(v):
        return "-" if v is None else f"{v:.2f}x"

    def cells(r):
        out = [
            r["model"],
            r["step"],
            r["variant"],
            f"{r['steps_per_s']:.2f}",
            f"{r['images_per_s']:.1f}",
            ratio(r["vs_reference"]),
            f"{100 * r['utilisation']:.0f}% ({r['precision']})",
        ]
        if args.settle:
            syncs = "-" if r["host_syncs"] is None else str(r["host_syncs"])
            out[4:4] = [f"{r['steps_per_s_min']:.2f}-{r['steps_per_s_max']:.2f}", syncs]
            out[-1:-1] = [ratio(r["vs_peer_bf16"])]
        return out

    name = args.name or ("bench_perf" if args.settle else "bench_train")
    title = f"One adversarial training step (PGD-{STEPS}, batch {BATCH} unless the model says, 32x32 input)"
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
            next((r["vs_reference"] or 0 for r in rows if (r["model"], r["step"]) == g and r["variant"] == label), 0)
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
