"""What the reference's PEFT inits did to the paper's LoRA and Adapter rows, measured: --peft-init reference (the
RoLI code's: Swin RoLI-LoRA A = B = 0, Adapters all zero, so those runs train the head, plus the Adapters' up
biases) against --peft-init standard (the methods as named: LoRA A random / B zero, Adapter down random / up zero),
for RoLI (from the ALP head) and RanLI (from the reference's random head), at the shipped CIFAR-10 learning rates
and, for standard, at a tenth of them.

The setting: CIFAR-10 from ../shared/data; a small Swin (timm swin_tiny layout, 32x32 input, patch 4, window 4,
embed 48, depths 2-2) adversarially pretrained by roli with PGD-7 on classes 0-4 as the robust source; transfer to
classes 5-9: ALP once (the shipped SGD 0.0125, decay 0.01), then each finetuning run from that ALP head (RoLI) or
from a random head (RanLI) with the shipped optimiser (the reference's AdamW) and learning rates of
roli/configs/cifar10/{roli,ranli}_{lora,adapter}.yaml, batch 64 (their lr_batch), PGD-7 training at eps 8/255.
Reported: test clean and PGD-10 (roli's scoring and the reference's) on every test image, AutoAttack standard on
the first --aa-n of them, and how many parameters each run could train.

    python benchmarks/bench_peft_init.py [--train-per-class N] [--test-per-class N] [--source-epochs N]
        [--epochs N] [--aa-n N] [--quick]

Outputs: benchmarks/results/bench_peft_init_<cpu|cuda>.md and bench_peft_init.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _common import device_name, write_results
from bench_fast_at import DEFAULT_DATA, RESULTS, prepared_subset

from roli._cli import parse_budget
from roli.config import TrainConfig
from roli.training.run import run

SWIN = {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 48, "depths": [2, 2], "num_heads": [3, 6]}
CONFIGS = Path(__file__).resolve().parent.parent / "roli" / "configs" / "cifar10"


def shipped(peft: str, role: str) -> dict:
    """The finetuning stage mapping of the shipped cifar10/<role>_<peft>.yaml (optimizer, lr, weight_decay)."""
    cfg = TrainConfig.from_file(CONFIGS / f"{role}_{peft}.yaml")
    return cfg.ft if role == "roli" else cfg.ranli


def autoattack(run_dir: Path, n: int, device: str) -> float | None:
    if n <= 0:
        return None
    out = run_dir.parent / f"{run_dir.name}-autoattack.json"  # beside the run: evaluate writes nothing inside one
    cmd = [sys.executable, "-m", "roli.evaluate", "--run", str(run_dir), "--autoattack", "standard", "--n-ex", str(n),
           "--device", device, "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return next(v for k, v in json.loads(out.read_text())["attacks"].items() if k.startswith("AutoAttack"))


def _run(cfg: TrainConfig) -> dict:
    """A finished run of an earlier invocation is read back (the benchmark resumes where it stopped)."""
    done = Path(cfg.run_dir) / "results.json"
    if done.is_file() and all((Path(cfg.run_dir) / r["dir"] / "done.json").is_file()
                              for r in json.loads(done.read_text()).values()):  # fmt: skip
        return json.loads(done.read_text())
    return run(cfg, overwrite=True, announce=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 as an npz (x_train, y_train, x_test, y_test)")
    ap.add_argument("--eps", default="8/255", help="Linf budget of every stage (step eps/4)")
    ap.add_argument("--source-lr", type=float, default=1e-3, help="AdamW learning rate of the source pretraining")
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=100, help="test images per class (5 classes)")
    ap.add_argument("--source-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5, help="epochs of ALP and of each finetuning run")
    ap.add_argument("--aa-n", type=int, default=100, help="test images AutoAttack runs on (0: none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "roli-bench-peft-init"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, one epoch, no AutoAttack")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class, args.source_epochs, args.epochs, args.aa_n = 40, 8, 1, 1, 0
    work = Path(args.work)
    npz = prepared_subset("bench_peft_init", args.data, work, args.train_per_class, args.test_per_class)
    eps = parse_budget(args.eps, "eps", "linf")
    common = dict(model="swin_tiny_patch4_window7_224", model_args=SWIN, dataset=f"npz:{npz}", eps=eps,
                  step_size=eps / 4, steps=7, val_steps=10, batch_size=64, seed=0, device=args.device,
                  head_init="reference")  # fmt: skip
    src = work / f"source-{args.train_per_class}-{args.source_epochs}-{args.eps.replace('/', '_')}-{args.source_lr:g}"
    weights = src / "backbone.pt"
    if not weights.exists():
        source = TrainConfig(method="pretrain", classes="0-4", epochs=args.source_epochs,
                             warmup=min(1, args.source_epochs - 1), optimizer="adamw", lr=args.source_lr,
                             weight_decay=0.05, random_backbone=True, run_dir=str(src / "run"), **common)  # fmt: skip
        run(source, overwrite=True, announce=False)
        state = torch.load(src / "run" / "pretrain" / "best.pt", map_location="cpu", weights_only=True)
        torch.save({k: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}, weights)
    # no warmup in the transfer stages: with a few epochs, a warmup epoch at lr 0 would be a large share of them
    target = dict(classes="5-9", checkpoint=str(weights), epochs=args.epochs, warmup=0, **common)
    alp_dir = work / f"alp-{args.epochs}-{args.eps.replace('/', '_')}-w0"
    alp = _run(TrainConfig(method="alp", alp={"optimizer": "sgd", "lr": 0.0125, "weight_decay": 0.01},
                           run_dir=str(alp_dir), **target))["alp"]  # fmt: skip
    rows = [{"method": "ALP", "peft": "linear", "init": "-", "lr": 0.0125, **_scores(alp), "aa": None}]
    print(json.dumps(rows[-1]), flush=True)
    for peft in ("lora", "adapter"):
        peft_args = {"lora_rank": 16, "lora_alpha": 16, "lora_dropout": 0.1} if peft == "lora" else {}
        for role in ("roli", "ranli"):
            stage = shipped(peft, role)
            for init, factor in (("reference", 1.0), ("standard", 1.0), ("standard", 0.1)):
                lr = stage["lr"] * factor
                name = f"{'RoLI' if role == 'roli' else 'RanLI'}-{peft}"
                run_dir = work / f"{name}-{init}-{factor:g}-{args.epochs}-{args.eps.replace('/', '_')}-w0"
                mapping = {**stage, "lr": lr}
                cfg = TrainConfig(method="ft", peft=peft, peft_init=init, stage_name=name,
                                  init=str(alp_dir / "alp" / "best.pt") if role == "roli" else "random",
                                  ft=mapping if role == "roli" else {}, ranli=mapping if role == "ranli" else {},
                                  run_dir=str(run_dir), **peft_args, **target)  # fmt: skip
                res = next(iter(_run(cfg).values()))
                rows.append({"method": name, "peft": peft, "init": init, "lr": lr, **_scores(res),
                             "aa": autoattack(run_dir, args.aa_n, args.device)})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    n_train = 5 * args.train_per_class * 9 // 10
    lines = [f"PEFT init, reference vs standard: CIFAR-10 classes 5-9 from a small Swin adversarially pretrained on "
             f"classes 0-4 ({args.source_epochs} epochs), PGD-7 training at eps {args.eps}, {args.epochs} epochs per "
             f"stage, {n_train} training images, {rows[0]['n']} test images (AutoAttack standard on the first "
             f"{args.aa_n}); {device_name(args.device)}, {stamp}", "",
             "| run | PEFT init | lr | trains (of trainable) | clean | PGD-10 | PGD-10 ref. scoring | AutoAttack |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    for r in rows:
        trains = "-" if r["trains"] is None else f"{r['trains']:,} of {r['trainable']:,}"
        lines.append(f"| {r['method']} | {r['init']} | {r['lr']:g} | {trains} | {pct(r['clean'])} | "
                     f"{pct(r['pgd10'])} | {pct(r['pgd10_ref'])} | {pct(r['aa'])} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results(args.out, "bench_peft_init", table, rows, {"date": stamp, "device": device_name(args.device)},
                  torch.device(args.device).type)  # fmt: skip


def _scores(res: dict) -> dict:
    t, trains = res["test"], res.get("trainable")
    return {"clean": t["clean"], "pgd10": t["pgd10"], "pgd10_ref": t.get("pgd10_reference"), "n": t["n"],
            "trains": trains and trains["receiving_gradient"], "trainable": trains and trains["trainable"]}  # fmt: skip


if __name__ == "__main__":
    main()
