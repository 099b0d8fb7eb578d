"""Benchmark of stage 1: linear probing from the feature cache, multi-head sweeps, and ALP steps.

1. One clean-LP epoch from cached features vs one epoch that recomputes the features (the backbone
   forward over the training set) as a run without the cache must.
2. An 8-head sweep (one pass, (8, C, D) weights, batched matmul) vs training one head.
3. One ALP step (PGD-7 + head update) ours vs a reference-style ALP step (the RoLI reference code:
   .backward() inside the attack, a batch-level best iterate, one more forward with a graph, then the
   head update through a full forward), fp32 and bf16.
Model: timm resnet18 at 32x32 (random weights; CIFAR statistics), batch 64 as in the reference protocol.
Timings: medians after warm-up, variants interleaved round-robin, ratios within one run.

    python benchmarks/bench_probe.py [--quick] [--n 2048]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_name, reference_pgd, round_robin, write_results

from roli.attacks import PGD
from roli.data import ArrayData
from roli.features import FeatureCache, alp_step, compute_features, fast_layout, train_linear_probe, train_linear_probes
from roli.models import apply_peft, create_classifier

RESULTS = Path(__file__).resolve().parent / "results"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def reference_alp_step(model, opt, x, y, eps=8 / 255, alpha=2 / 255, steps=7):
    """As the reference code: its attack (.backward() inside, batch-level best iterate, an extra forward
    with a graph), then a training forward through the whole model and the head update."""
    best_x = reference_pgd(model, x, y, eps, alpha, steps, zero_grad=opt.zero_grad)
    model.train()
    loss = F.cross_entropy(model(best_x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def timed(fn, reps):
    return round_robin({"run": fn}, reps)["run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=2048, help="training images for the LP measurements")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    torch.manual_seed(0)
    model = create_classifier("resnet18", 10, mean=CIFAR_MEAN, std=CIFAR_STD, input_size=None)
    data = ArrayData(
        torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (args.n,)), 10, "random"
    )
    val = compute_features(model, ArrayData(data.x[:256], data.y[:256], 10, "v"))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root)
        cache.get(model, data, "train")  # the one pass that fills the cache (not timed)

        t_lookup = timed(lambda: cache.get(model, data, "train"), reps)  # once per run, not per epoch
        cached = cache.get(model, data, "train")

        def lp_cached():
            train_linear_probe((cached.x, cached.y), val, 10, lr=0.1, epochs=1, batch_size=256)

        def lp_recompute():
            train_linear_probe(lambda e: compute_features(model, data), val, 10, lr=0.1, epochs=1, batch_size=256)

        t_cached, t_recomp = timed(lp_cached, reps), timed(lp_recompute, max(2, reps // 2))
        rows.append(
            {
                "measure": "LP epoch",
                "variant": "from the cache",
                "seconds": t_cached,
                "ratio": t_recomp / t_cached,
                "target": ">= 100x faster than recomputing",
            }
        )
        rows.append(
            {"measure": "LP epoch", "variant": "recompute features", "seconds": t_recomp, "ratio": 1.0, "target": ""}
        )
        rows.append(
            {
                "measure": "cache lookup (once per run)",
                "variant": "hash weights + data, mmap",
                "seconds": t_lookup,
                "ratio": t_recomp / t_lookup,
                "target": "",
            }
        )
        f = cache.get(model, data, "train")
        lrs = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
        sweep = round_robin(
            {
                "1 head": lambda: train_linear_probes((f.x, f.y), val, 10, lrs[:1], epochs=5, batch_size=256),
                "8 heads": lambda: train_linear_probes((f.x, f.y), val, 10, lrs, epochs=5, batch_size=256),
            },
            reps,
        )
        for k, t in sweep.items():
            rows.append(
                {
                    "measure": "LP sweep (5 epochs)",
                    "variant": k,
                    "seconds": t,
                    "ratio": t / sweep["1 head"],
                    "target": "<= 1.5x the time of one head" if k == "8 heads" else "",
                }
            )
    apply_peft(model, "linear")
    x, y = data.x[:64].float() / 255, data.y[:64]
    ours16 = copy.deepcopy(model)
    fast_layout(ours16, "bf16")  # what adversarial_linear_probe does for bf16 on a conv backbone
    opts = {k: torch.optim.SGD(m.head.parameters(), lr=0.01, momentum=0.9) for k, m in (("32", model), ("16", ours16))}
    budget = dict(eps=8 / 255, step_size=2 / 255, steps=7, keep="last", seed=0)
    attacks = {"fp32": PGD(model, **budget), "bf16": PGD(ours16, precision="bf16", **budget)}
    steps = round_robin(
        {
            "reference-style fp32": lambda: reference_alp_step(model, opts["32"], x, y),
            "ours fp32": lambda: alp_step(model, attacks["fp32"], opts["32"], x, y, "fp32"),
            "ours bf16": lambda: alp_step(ours16, attacks["bf16"], opts["16"], x, y, "bf16"),
        },
        reps,
    )
    ref = steps["reference-style fp32"]
    for k, t in steps.items():
        target = {"ours fp32": ">= 1.1x", "ours bf16": ">= 1.8x"}.get(k, "")
        rows.append(
            {
                "measure": "ALP step (PGD-7 + update, batch 64)",
                "variant": k,
                "seconds": t,
                "ratio": ref / t,
                "target": target,
                "images_per_s": 64 / t,
            }
        )
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    device = cpu_name()
    lines = [
        f"Stage-1 benchmark on {device}, {stamp}; torch {torch.__version__}; resnet18 @32x32, {args.n} images",
        "",
        "| measure | variant | median s | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = (
            f"{r['ratio']:.1f}x faster"
            if r["measure"] == "LP epoch" and r["variant"] == "from the cache"
            else (f"{r['ratio']:.2f}x the time" if r["measure"].startswith("LP sweep") else f"{r['ratio']:.2f}x")
        )
        lines.append(f"| {r['measure']} | {r['variant']} | {r['seconds']:.4f} | {ratio} | {r['target']} |")
    table = "\n".join(lines)
    print(table)
    write_results(args.out, "bench_probe", table, rows, {"date": stamp, "device": device})


if __name__ == "__main__":
    main()
