"""The figures of a fixed set of runs, to show that a change of the code's structure changed no result.

    python benchmarks/fixed_runs.py --out before.json     # on the old code
    python benchmarks/fixed_runs.py --out after.json      # on the new code
    python benchmarks/fixed_runs.py --compare before.json after.json

The set (CPU-sized, digits from scikit-learn): the built-in demo (clean LP, ALP, RoLI and RanLI finetuning);
a RoLI run of a one-block ViT with LoRA; an fgsm-rs run with the catastrophic-overfitting guard checking every
5 steps; `roli evaluate --run` of the LoRA run with PGD and AutoAttack (standard, 48 images); the same
evaluation by two processes under torchrun. Recorded: every stage's results.json figures, every epoch's
training loss and accuracy, and every evaluation's accuracies and per-example outcomes. --compare prints each
difference and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VIT = (
    "--model vit_tiny_patch16_224 --model-arg img_size=8 --model-arg patch_size=2 --model-arg depth=1 "
    "--model-arg embed_dim=48 --model-arg num_heads=2 --dataset digits --random-backbone --eps 0.1 "
    "--step-size 0.025 --val-steps 3 --batch-size 64 --warmup 1"
).split()


def sh(*argv: str, env: dict | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        sys.exit(f"fixed_runs: {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def record_run(run: Path) -> dict:
    out = {"results": json.loads((run / "results.json").read_text())}
    for metrics in sorted(run.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        out[metrics.parent.name] = [
            {k: r[k] for k in sorted(r) if k not in ("seconds", "images_per_s", "img_s")} for r in rows
        ]
    return out


def record_eval(path: Path) -> dict:
    r = json.loads(path.read_text())
    return {k: r[k] for k in ("n", "clean", "attacks", "per_example", "worst_case", "autoattack_per_attack") if k in r}


def record(work: Path) -> dict:
    py = sys.executable
    figures = {}
    sh(py, "-c", f"from roli.training.demo import run_demo; run_demo({str(work / 'demo')!r})")
    for method in ("lp", "roli"):
        figures[f"demo/{method}"] = record_run(work / "demo" / method)
    lora = work / "lora"
    sh(
        py,
        "-m",
        "roli.train",
        *VIT,
        "--method",
        "roli",
        "--peft",
        "lora",
        "--epochs",
        "3",
        "--steps",
        "3",
        "--classes",
        "0-4",
        "--compare-ranli",
        "--run-dir",
        str(lora),
    )
    figures["lora"] = record_run(lora)
    fgsm = work / "fgsm"
    sh(
        py,
        "-m",
        "roli.train",
        *VIT,
        "--method",
        "ft",
        "--attack",
        "fgsm-rs",
        "--guard-every",
        "5",
        "--epochs",
        "3",
        "--lr",
        "0.003",
        "--run-dir",
        str(fgsm),
    )
    figures["fgsm-rs"] = record_run(fgsm)
    figures["fgsm-rs"]["log"] = [
        line.split(" ", 2)[-1] for line in (fgsm / "train.log").read_text().splitlines() if "guard" in line
    ]
    one = work / "eval1.json"
    sh(py, "-m", "roli.evaluate", "--run", str(lora), "--autoattack", "standard", "--n-ex", "48", "--out", str(one))
    figures["evaluate"] = record_eval(one)
    two = work / "eval2.json"
    sh(
        py,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "roli.evaluate",
        "--run-dir",
        str(lora),
        "--n-ex",
        "96",
        "--batch-size",
        "32",
        "--out",
        str(two),
        env={"OMP_NUM_THREADS": "1"},
    )
    figures["evaluate-torchrun-2"] = record_eval(two)
    return figures


def diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the figures here (JSON)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        found = diff(a, b)
        print("\n".join(found) if found else f"identical: {len(a)} records")
        sys.exit(1 if found else 0)
    with tempfile.TemporaryDirectory(prefix="roli-fixed-") as work:
        figures = record(Path(work))
    text = json.dumps(figures, indent=1, sort_keys=True)
    Path(args.out).write_text(text + "\n") if args.out else print(text)


if __name__ == "__main__":
    main()
