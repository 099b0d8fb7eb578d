"""The paper's grid on CPU-sized settings: `roli grid` against the same configs run one by one.

Three datasets (digits 0-4, digits 5-9, a CIFAR-10 subset of five classes from ../shared/data), each with the
paper's eleven configs: alp, roli_{full,lora,adapter,bias,vpt} (ALP, then finetuning from the ALP head) and
ranli_{full,lora,adapter,bias,vpt}, on a one-block ViT (a random backbone: the point is the schedule, not the
accuracy). One by one, each roli config trains its own ALP stage (18 ALP stages); the grid trains each
distinct one once (3). All run sequentially on this machine (one run at a time, `--jobs 1`). The grid runs
twice: with `--fresh-processes` (each run a new `python -m roli.train`, as one by one: the ratio is the
dedup's alone) and as it runs by default (each run forked from a process with roli, torch and timm imported:
the dedup plus the start-up saved). Every run's figures are compared with the one-by-one run: they must be
identical.

    python benchmarks/bench_grid.py [--epochs 3] [--steps 7] [--quick] [--out DIR]

Writes a Markdown table and CSV into benchmarks/results/ (bench_grid.md, bench_grid.csv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_name

ROOT = Path(__file__).resolve().parent.parent
CIFAR = Path(os.environ.get("ROLI_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10" / "cifar10.npz"))
PEFTS = ("full", "lora", "adapter", "bias", "vpt")


def cifar_subset(path: Path, per_class_train: int, per_class_test: int) -> Path:
    """Five CIFAR-10 classes, a few images each, as an npz in the benchmark's temporary folder."""
    with np.load(CIFAR) as f:
        out = {}
        for split, n in (("train", per_class_train), ("test", per_class_test)):
            x, y = f[f"x_{split}"], f[f"y_{split}"]
            keep = np.concatenate([np.nonzero(y == c)[0][:n] for c in range(5)])
            out[f"x_{split}"], out[f"y_{split}"] = x[keep], y[keep]
    np.savez(path, **out)
    return path


def write_configs(folder: Path, datasets: dict, epochs: int, steps: int) -> list[Path]:
    files = []
    for tag, (dataset, classes, size, patch) in datasets.items():
        subset = f"classes: '{classes}'\n" if classes else ""
        base = (
            f"model: vit_tiny_patch16_224\nmodel_args: {{img_size: {size}, patch_size: {patch}, depth: 1, "
            f"embed_dim: 64, num_heads: 2}}\ndataset: '{dataset}'\n"
            + subset
            + f"eps: 0.1\nstep_size: 0.025\nsteps: {steps}\nval_steps: 3\nepochs: {epochs}\nwarmup: 1\n"
            "batch_size: 64\nrandom_backbone: true\nhead_init: reference\n"
        )
        variants = {"alp": "method: alp\n"}
        for peft in PEFTS:
            variants[f"roli_{peft}"] = f"method: roli\npeft: {peft}\nlr: 0.001\n"
            variants[f"ranli_{peft}"] = f"method: ft\ninit: random\npeft: {peft}\nlr: 0.002\n"
        for name, text in variants.items():
            files.append(folder / f"{tag}_{name}.yaml")
            files[-1].write_text(base + text)
    return files


def results_of(run: Path) -> dict:
    return {k: {"test": v["test"], "val": v["val"]} for k, v in json.loads((run / "results.json").read_text()).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=7, help="PGD steps of training (the paper's 7)")
    p.add_argument("--quick", action="store_true", help="one dataset (digits 0-4), 1 epoch, PGD-2")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="roli-bench-grid-"))
    datasets = {"d04": ("digits", "0-4", 8, 2), "d59": ("digits", "5-9", 8, 2)}
    if CIFAR.is_file():
        datasets["c10"] = (f"npz:{cifar_subset(work / 'cifar5.npz', 120, 40)}", None, 32, 4)
    if args.quick:
        datasets, args.epochs, args.steps = {"d04": datasets["d04"]}, 1, 2
    (work / "configs").mkdir()
    files = write_configs(work / "configs", datasets, args.epochs, args.steps)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2))}
    roli_cmd = [sys.executable, "-m", "roli.train"]

    t0 = time.perf_counter()  # one by one, as a user without the grid runs them
    for f in files:
        subprocess.run(
            [*roli_cmd, "--config", str(f), "--run-dir", str(work / "solo" / f.stem)],
            check=True,
            capture_output=True,
            env=env,
        )
    solo_s = time.perf_counter() - t0

    def run_grid(folder: str, *extra: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "roli.grid", *map(str, files), "--out", str(work / folder), "--jobs", "1", *extra],
            check=True,
            capture_output=True,
            env=env,
        )
        return time.perf_counter() - t0

    fresh_s = run_grid("grid-fresh", "--fresh-processes")
    grid_s = run_grid("grid")

    def compare(root: Path) -> tuple[int, int, list[str]]:
        grid = json.loads((root / "grid.json").read_text())
        same = compared = 0
        differ = []
        alp_of = {
            c: Path(r["dir"])
            for r in grid["runs"].values()
            if r["dir"].startswith(str(root / "alp"))
            for c in r["configs"]
        }
        for f in files:
            name = f.stem
            solo = results_of(work / "solo" / name)
            mine = results_of(alp_of[name]) if name in alp_of else {}  # the shared ALP run of this config
            if not name.endswith("_alp"):
                mine |= results_of(root / name)
            for stage, r in solo.items():
                compared += 1
                if stage in mine and mine[stage] == r:
                    same += 1
                else:
                    differ.append(f"{root.name}/{name}:{stage}")
        return same, compared, differ

    same_f, compared_f, differ_f = compare(work / "grid-fresh")
    same, compared, differ = compare(work / "grid")
    differ += differ_f

    def training_seconds(root: Path) -> float:  # every stage's epochs, from metrics.jsonl
        return sum(
            json.loads(line)["seconds"] for m in root.rglob("metrics.jsonl") for line in m.read_text().splitlines()
        )

    train_solo, train_grid = training_seconds(work / "solo"), training_seconds(work / "grid")
    alp_solo = sum(1 for f in files if not f.stem.split("_", 1)[1].startswith("ranli"))
    alp_grid = len(list((work / "grid" / "alp").iterdir()))
    rows = [
        {
            "runs": len(files),
            "one_by_one_s": round(solo_s, 1),
            "grid_s": round(grid_s, 1),
            "speedup": round(solo_s / grid_s, 3),
            "grid_fresh_s": round(fresh_s, 1),
            "speedup_fresh": round(solo_s / fresh_s, 3),
            "training_one_by_one_s": round(train_solo, 1),
            "training_grid_s": round(train_grid, 1),
            "alp_stages_one_by_one": alp_solo,
            "alp_stages_grid": alp_grid,
            "stages_identical": f"{same}/{compared}",
            "stages_identical_fresh": f"{same_f}/{compared_f}",
            "epochs": args.epochs,
            "steps": args.steps,
        }
    ]
    stamp = time.strftime("%Y-%m-%d")
    table = "\n".join(
        [
            f"roli grid vs the same {len(files)} configs one by one ({stamp}, {cpu_name()}; "
            f"{len(datasets)} datasets x 11 configs, one-block ViT, PGD-{args.steps}, {args.epochs} epochs, one run at "
            "a time)",
            "",
            "| runs | wall: one by one | wall: grid --fresh-processes (speed-up) | wall: grid (speed-up) | training "
            "epochs' time: one by one / grid | ALP stages trained | identical figures: fresh, grid |",
            "|---|---|---|---|---|---|---|",
            f"| {len(files)} | {solo_s:.0f} s | {fresh_s:.0f} s ({solo_s / fresh_s:.2f}x) | {grid_s:.0f} s "
            f"({solo_s / grid_s:.2f}x) | {train_solo:.0f} s / {train_grid:.0f} s "
            f"({train_solo / max(train_grid, 1e-9):.2f}x) | {alp_solo} / {alp_grid} | "
            f"{same_f}/{compared_f}, {same}/{compared} |",
        ]
    )
    if differ:
        table += f"\n\nstages whose figures differ: {', '.join(differ)}"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grid.md").write_text(table + "\n")
    import csv

    path = out / "bench_grid.csv"  # earlier rows kept; columns added since are empty in them
    old = list(csv.DictReader(path.open())) if path.is_file() else []
    fields = ["date", "cpu", *rows[0]]
    fields += [k for r in old for k in r if k not in fields]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(fields)), restval="")
        w.writeheader()
        w.writerows([*old, {"date": stamp, "cpu": cpu_name(), **rows[0]}])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
