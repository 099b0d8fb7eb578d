"""What the random head's initialisation does to RoLI's gain over RanLI, on real images.

The setting of bench_fast_at.py (CIFAR-10 from ../shared/data, a small CNN adversarially pretrained by roli with
PGD-7 on classes 0-4 as the robust source, transfer to classes 5-9, PGD-7 training, Linf eps 8/255), with the
same budget for every row:
- RoLI: ALP from the reference head, then full finetuning from the ALP head (lr 2e-4);
- RanLI with the reference's head (kaiming_normal fan_out weights, bias -log(99): src/models/mlp.py),
  with torch's nn.Linear init, and from a zero head (full finetuning from the random head, lr 1e-3).
Reported: test clean, PGD-10 and AutoAttack (standard) accuracy on the same test images.

    python benchmarks/bench_head_init.py [--train-per-class N] [--test-per-class N] [--source-epochs N]
        [--epochs N] [--eps 8/255] [--quick]

Outputs: benchmarks/results/bench_head_init_<cpu|cuda>.md and bench_head_init.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path

import torch
from _common import device_name, write_results
from bench_fast_at import DEFAULT_DATA, RESULTS, autoattack, prepared_subset, source_backbone

from roli._cli import parse_budget
from roli.config import TrainConfig
from roli.training.run import run

INITS = ("reference", "torch", "zero")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 as an npz (x_train, y_train, x_test, y_test)")
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=100, help="test images per class (5 classes)")
    ap.add_argument("--source-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5, help="epochs of each transfer stage (ALP, finetuning)")
    ap.add_argument("--aa-version", default="standard", choices=["standard", "plus", "rand"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--work",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "roli-bench-head-init"),
        help="run directories and the data subset (never inside the repository)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, one epoch, no AutoAttack")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class, args.source_epochs, args.epochs = 40, 8, 1, 1
    work = Path(args.work)
    npz = prepared_subset("bench_head_init", args.data, work, args.train_per_class, args.test_per_class)
    eps = parse_budget(args.eps, "eps", "linf")
    common = dict(
        model="roli.models.small:small_cnn",
        dataset=f"npz:{npz}",
        eps=eps,
        step_size=eps / 4,
        steps=7,
        val_steps=10,
        batch_size=64,
        seed=0,
        device=args.device,
    )
    src = work / f"source-{args.train_per_class}-{args.source_epochs}-{args.eps.replace('/', '_')}"
    weights = source_backbone(src, args.source_epochs, common)
    target = dict(
        classes="5-9",
        checkpoint=str(weights),
        epochs=args.epochs,
        warmup=min(1, args.epochs - 1),
        weight_decay=0.01,
        **common,
    )
    rows = []

    def row(name: str, init: str, res: dict, run_dir: Path, stage: str | None) -> None:
        aa = None if args.quick else autoattack(run_dir, stage, args.aa_version, args.device)
        test = res["test"]
        rows.append(
            {
                "method": name,
                "head_init": init,
                "clean": test["clean"],
                "pgd10": test["pgd10"],
                "autoattack": aa,
                "n_test": test["n"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    roli_dir = work / "roli-reference"
    res = run(
        TrainConfig(
            method="roli",
            compare_ranli=True,
            head_init="reference",
            alp_lr=0.05,
            lr=2e-4,
            ranli_lr=1e-3,
            run_dir=str(roli_dir),
            **target,
        ),
        overwrite=True,
    )
    row("RoLI (ALP head)", "reference (ALP's start)", res["RoLI-full"], roli_dir, "roli-ft")
    row("RanLI", "reference", res["RanLI-full"], roli_dir, "ranli-ft")
    for init in INITS[1:]:
        run_dir = work / f"ranli-{init}"
        res = run(
            TrainConfig(method="ft", init="random", head_init=init, lr=1e-3, run_dir=str(run_dir), **target),
            overwrite=True,
        )
        row("RanLI", init, next(iter(res.values())), run_dir, None)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    n_train = 5 * args.train_per_class * 9 // 10
    lines = [f"Head init and RoLI's gain, CIFAR-10 classes 5-9 from a robust small CNN (classes 0-4), PGD-7 training "
             f"at eps {args.eps}, {args.epochs} epochs per stage ({args.source_epochs} for the source), {n_train} "
             f"training images, {rows[0]['n_test']} test images; {device_name(args.device)}, {stamp}", "",
             "| method | head init | clean | PGD-10 | AutoAttack |", "|---|---|---|---|---|"]  # fmt: skip

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    for r in rows:
        lines.append(
            f"| {r['method']} | {r['head_init']} | {pct(r['clean'])} | {pct(r['pgd10'])} | {pct(r['autoattack'])} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(
        args.out,
        "bench_head_init",
        table,
        rows,
        {"date": stamp, "device": device_name(args.device)},
        torch.device(args.device).type,
    )


if __name__ == "__main__":
    main()
