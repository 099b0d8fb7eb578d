"""Benchmark of fast adversarial finetuning: PGD-7 against the single-step FGSM-RS and N-FGSM, for RoLI and
RanLI, on real images.

The built-in default's recipe on CIFAR-10 (the npz in ../shared/data): a small CNN adversarially pretrained
by roli (PGD-7) on classes 0-4 is the robust source; it is transferred to classes 5-9 with RoLI (ALP, then
full finetuning from the ALP head) and RanLI (full finetuning from a random head), each stage trained with
each attack, at each eps. Reported per row: test clean, PGD-10 and AutoAttack (standard) accuracy on the
same test images, the training time (the epochs' step loops, guard checks included, validation excluded)
and the forward passes per training image (counted by a hook on the network's first layer while the
training steps run). The single-step rows say what the catastrophic-overfitting guard did.

    python benchmarks/bench_fast_at.py [--data PATH] [--eps 8/255,2/255] [--train-per-class N]
        [--test-per-class N] [--source-epochs N] [--epochs N] [--aa-version standard] [--quick]

Defaults are the full protocol (all 5,000 training images per class, 1,000 test images); on a 2-core
CPU that takes many hours, so the figures in README say which reduced settings they ran with.
Outputs: benchmarks/results/bench_fast_at_<cpu|cuda>.md, bench_fast_at.csv (appended), bench_fast_at.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import device_name, write_results

import roli.training.guard as G
import roli.training.loop as L
import roli.training.pipeline as P
from roli._cli import parse_budget
from roli.attacks import fast
from roli.config import TrainConfig
from roli.specs import ModelSpec
from roli.training.run import run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = Path(os.environ.get("ROLI_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10" / "cifar10.npz"))


class Forwards:
    """Images through the network's first layer while training steps run (validation and guard checks
    pause the count), per stage."""

    def __init__(self):
        self.on, self.images, self.fits = False, 0, []  # fits: (stage name, images) of each fit, in order

    def hook(self, module, inputs):
        if self.on:
            self.images += inputs[0].shape[0]

    @contextlib.contextmanager
    def paused(self):
        was, self.on = self.on, False
        try:
            yield
        finally:
            self.on = was


def instrument(counter: Forwards) -> None:
    """Count forwards through every model the trainer builds, during its training steps only."""
    build, fit, validate, check = ModelSpec.build, P.fit, L._validate, G.Guard.check

    def build_model(*a, **k):
        model = build(*a, **k)
        first = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        first.register_forward_pre_hook(counter.hook)
        return model

    def counted_fit(stage, *a, **k):
        counter.on, counter.images = True, 0
        try:
            return fit(stage, *a, **k)
        finally:
            counter.on = False
            counter.fits.append((stage.name, counter.images))

    def paused(fn):
        def wrapper(*a, **k):
            with counter.paused():
                return fn(*a, **k)

        return wrapper

    ModelSpec.build = build_model
    P.fit, L._validate, G.Guard.check = counted_fit, paused(validate), paused(check)


def prepared_subset(bench: str, data: str, work: Path, train_per_class: int, test_per_class: int) -> Path:
    """The benchmark's class-balanced CIFAR-10 subset in `work`, made once from the npz `data` (exits naming
    --data when it is missing)."""
    if not Path(data).is_file():
        sys.exit(f"{bench}: {data} not found; pass --data PATH to CIFAR-10 as an npz")
    work.mkdir(parents=True, exist_ok=True)
    npz = work / f"cifar10-{train_per_class}-{test_per_class}.npz"
    if not npz.exists():
        subset(Path(data), npz, train_per_class, test_per_class)
    return npz


def subset(src: Path, dst: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> None:
    """A class-balanced random subset of the CIFAR-10 npz (all ten classes), written outside the repository."""
    d = np.load(src)
    rng = np.random.default_rng(seed)

    def pick(y, n):
        idx = [rng.permutation(np.nonzero(y == c)[0])[:n] for c in range(10)]
        return np.sort(np.concatenate(idx))

    tr, te = pick(d["y_train"], train_per_class), pick(d["y_test"], test_per_class)
    np.savez(dst, x_train=d["x_train"][tr], y_train=d["y_train"][tr], x_test=d["x_test"][te], y_test=d["y_test"][te])


def source_backbone(src: Path, epochs: int, common: dict) -> Path:
    """The robust source: the small CNN adversarially pretrained (PGD-7) on classes 0-4, trained once into `src`;
    returns its backbone's weights file."""
    weights = src / "backbone.pt"
    if not weights.exists():
        run(
            TrainConfig(
                method="pretrain",
                classes="0-4",
                epochs=epochs,
                warmup=min(1, epochs - 1),
                lr=0.05,
                run_dir=str(src / "run"),
                **common,
            ),
            overwrite=True,
        )
        state = torch.load(src / "run" / "pretrain" / "best.pt", map_location="cpu", weights_only=True)
        torch.save({k: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}, weights)
    return weights


def stage_seconds(run_dir: Path, stage: str) -> float:
    rows = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return sum(r["seconds"] for r in rows)


def autoattack(run_dir: Path, stage: str | None, version: str, device: str) -> float:
    """AutoAttack accuracy of a finished stage (None: the run's only one) on the run's test set, through python -m
    roli.evaluate --run (the trainer would also attack its ALP stage, which the table does not need)."""
    out = run_dir.parent / f"{run_dir.name}-autoattack-{stage or 'run'}.json"  # beside the run, never inside
    cmd = [
        sys.executable,
        "-m",
        "roli.evaluate",
        "--run",
        str(run_dir),
        *(["--stage", stage] if stage else []),
        "--autoattack",
        version,
        "--device",
        device,
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    attacks = json.loads(out.read_text())["attacks"]
    return next(v for k, v in attacks.items() if k.startswith("AutoAttack"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 as an npz (x_train, y_train, x_test, y_test)")
    ap.add_argument("--eps", default="8/255,2/255", help="comma-separated Linf budgets")
    ap.add_argument("--attacks", default=",".join(fast.ATTACKS))
    ap.add_argument("--train-per-class", type=int, default=5000)
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class (5 classes: 1000)")
    ap.add_argument("--source-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=10, help="epochs of each transfer stage (ALP, finetuning)")
    ap.add_argument("--aa-version", default="standard", choices=["standard", "plus", "rand"])
    ap.add_argument("--guard-every", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--work",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "roli-bench-fast-at"),
        help="run directories and the data subset (never inside the repository)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--keep-rows",
        action="store_true",
        help="also report the rows measured before with this --work directory (e.g. another eps)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="write the table, CSV and PNG of the rows stored in --work, measuring nothing",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, one epoch, no AutoAttack")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class, args.source_epochs, args.epochs = 40, 8, 1, 1
    work = Path(args.work)
    if args.report_only:
        stored = [json.loads(x) for x in (work / "rows.jsonl").read_text().splitlines()]
        report(stored, stored, args)
        return
    npz = prepared_subset("bench_fast_at", args.data, work, args.train_per_class, args.test_per_class)
    counter = Forwards()
    instrument(counter)
    attacks = args.attacks.split(",")
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    store = work / "rows.jsonl"  # every row measured with this work directory (--keep-rows reports them too)
    kept = [json.loads(x) for x in store.read_text().splitlines()] if args.keep_rows and store.exists() else []
    if not args.keep_rows:
        store.unlink(missing_ok=True)
    rows = []
    for eps_text in args.eps.split(","):
        eps = parse_budget(eps_text, "eps", "linf")
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
            guard_every=args.guard_every,
        )
        tag = eps_text.replace("/", "_")
        weights = source_backbone(
            work / f"source-{tag}-{args.train_per_class}-{args.source_epochs}", args.source_epochs, common
        )
        target = TrainConfig(
            method="roli",
            compare_ranli=True,
            classes="5-9",
            checkpoint=str(weights),
            epochs=args.epochs,
            warmup=min(1, args.epochs - 1),  # a warmup epoch runs at lr 0: one epoch alone has none
            alp_lr=0.05,
            lr=2e-4,
            ranli_lr=1e-3,
            weight_decay=0.01,
            **common,
        )
        n_train = len(target.data_spec.load()[0])
        for attack in attacks:
            run_dir = work / f"transfer-{tag}-{attack}"
            counter.fits = []
            t0 = time.time()
            res = run(replace(target, attack=attack, run_dir=str(run_dir)), overwrite=True)
            wall = time.time() - t0
            fits = dict(zip(("alp", "roli-ft", "ranli-ft"), (n for _, n in counter.fits), strict=True))
            for method, stages, label in (
                ("RoLI", ("alp", "roli-ft"), "RoLI-full"),
                ("RanLI", ("ranli-ft",), "RanLI-full"),
            ):
                r = res[label]
                alp, ft = res["alp"]["val"]["train_attack"], r["val"]["train_attack"]
                epochs = len(stages) * args.epochs
                aa = None if args.quick else autoattack(run_dir, stages[-1], args.aa_version, args.device)
                rows.append(
                    {
                        "eps": eps_text,
                        "method": method,
                        "attack": fast.label(attack, 7),
                        "train_attack": f"ALP {alp}; FT {ft}" if method == "RoLI" and alp != ft else ft,
                        "test_clean": r["test"]["clean"],
                        "test_pgd10": r["test"]["pgd10"],
                        "test_aa": aa,
                        "n_test": r["test"]["n"],
                        "train_s": sum(stage_seconds(run_dir, s) for s in stages),
                        "forwards_per_image": sum(fits[s] for s in stages) / (n_train * epochs),
                        "run_wall_s": wall,
                        "n_train": n_train,
                        "epochs": args.epochs,
                        "source_epochs": args.source_epochs,
                        "date": stamp,
                    }
                )
            with store.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[-2:])
            print(json.dumps(rows[-2:]), flush=True)
        # The report after each eps: an interrupted benchmark keeps what it measured. The CSV gets this eps's rows.
        report(kept + rows, [r for r in rows if r["eps"] == eps_text], args)


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _times(v):
    return "-" if v is None else f"{v:.2f}x"


def report(rows: list[dict], new_rows: list[dict], args) -> None:
    """The Markdown table of `rows` (with the targets' verdicts) and the PNG; `new_rows` appended to the CSV."""
    device = device_name(args.device)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    dates = sorted({r["date"] for r in rows})
    lines = [f"### Fast adversarial finetuning ({', '.join(dates)}, {device}, torch {torch.__version__})", "",
             "CIFAR-10: a small CNN adversarially pretrained by roli (PGD-7) on classes 0-4, transferred to classes "
             "5-9 with RoLI (ALP, then full finetuning) and RanLI (full finetuning from a random head), every stage "
             f"trained with the row's attack; AutoAttack {args.aa_version} and PGD-10 on the same test images; guard "
             f"every {args.guard_every} steps. Time: the training steps (guard checks included, validation "
             "excluded); RoLI's includes its ALP stage. Forwards: passes through the network per training image "
             "and epoch (attack and update).", "",
             "| eps | method | attack | trained with | train images | epochs (source) | test images | clean | PGD-10 | "
             "AutoAttack | train s | speed-up vs PGD-7 | forwards / image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = {(r["eps"], r["method"]): r for r in rows if r["attack"] == "PGD-7"}
    for r in rows:
        b = base.get((r["eps"], r["method"]))
        r["speedup"] = b["train_s"] / r["train_s"] if b else None
        lines.append(
            f"| {r['eps']} | {r['method']} | {r['attack']} | {r['train_attack']} | {r['n_train']} | "
            f"{r['epochs']} ({r['source_epochs']}) | {r['n_test']} | {_pct(r['test_clean'])} | "
            f"{_pct(r['test_pgd10'])} | {_pct(r['test_aa'])} | {r['train_s']:.1f} | {_times(r['speedup'])} | "
            f"{r['forwards_per_image']:.2f} |"
        )
    lines += [
        "",
        "Target (RoLI): a single-step attack within 1 point of PGD-7's AutoAttack accuracy at >= 2.5x less "
        "training time.",
    ]
    for (eps, method), b in base.items():
        if method != "RoLI":
            continue
        key = "test_aa" if b["test_aa"] is not None else "test_pgd10"
        for r in rows:
            if r["eps"] != eps or r["method"] != method or r is b:
                continue
            gap = round(100 * (r[key] - b[key]), 6)  # exact counts: -1.0000000000000009 is one point
            ok = gap >= -1.0 and r["speedup"] >= 2.5
            what = "AutoAttack" if key == "test_aa" else "PGD-10"
            lines.append(
                f"- eps {eps}, {r['attack']}: {gap:+.1f} points ({what}) at {r['speedup']:.2f}x less time: "
                f"{'met' if ok else 'not met'}"
            )
    table = "\n".join(lines)
    print(table)
    meta = {"device": device, "aa": args.aa_version, "guard_every": args.guard_every}
    write_results(args.out, "bench_fast_at", table, new_rows, meta, kind)
    plot(rows, Path(args.out) / f"bench_fast_at_{kind}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epss = list(dict.fromkeys(r["eps"] for r in rows))
    fig, axes = plt.subplots(1, len(epss), figsize=(5.5 * len(epss), 4.2), squeeze=False)
    markers = {"PGD-7": "o", "FGSM-RS": "s", "N-FGSM": "^"}
    colors = {"RoLI": "tab:blue", "RanLI": "tab:orange"}
    for ax, eps in zip(axes[0], epss, strict=True):
        for r in (r for r in rows if r["eps"] == eps):
            acc = r["test_aa"] if r["test_aa"] is not None else r["test_pgd10"]
            ax.scatter(
                r["train_s"],
                100 * acc,
                marker=markers[r["attack"]],
                color=colors[r["method"]],
                s=60,
                label=f"{r['method']} {r['attack']}",
            )
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("robust accuracy (%), AutoAttack" if rows[0]["test_aa"] is not None else "PGD-10 accuracy (%)")
        ax.set_title(f"eps {eps}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
