"""One run of `python -m roli.train`: each method's stages in order, the final table, the run's log.

roli.train parses flags into a TrainConfig and calls run(); the built-in demonstration
(roli.training.demo) calls run() too.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from roli import _dist as D
from roli._io import first_line, save_json
from roli.data import ArrayData
from roli.models import apply_peft
from roli.training.config import ConfigError, TrainConfig
from roli.training.pipeline import (
    build_model,
    check_backbone,
    check_forward,
    checkpoint_of,
    evaluate_test,
    linear_probe,
    load_init,
    load_splits,
    train_alp,
    train_full,
)
from roli.training.rundir import (
    RunLock,
    check_fingerprint,
    check_run_dir,
    disk_full,
    fingerprint,
    input_paths,
    prepare_run_dir,
    write_fingerprint,
)

log = logging.getLogger("roli.train")


def stage_dir(label: str) -> str:
    """The folder of a stage inside a run directory, from its label in results.json."""
    if label in ("pretrain", "lp", "alp"):
        return label
    return "roli-ft" if label.startswith("RoLI-") else "ranli-ft" if label.startswith("RanLI-") else "ft"


def apply_run_peft(cfg: TrainConfig, model) -> None:
    """The run's PEFT method (cfg.peft and its options) on `model`; a misfit is a one-line ConfigError."""
    try:
        apply_peft(model, cfg.peft, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                   lora_targets=cfg.lora_targets, adapter_reduction=cfg.adapter_reduction, vpt_tokens=cfg.vpt_tokens,
                   vpt_dropout=cfg.vpt_dropout)  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ConfigError(f"peft: {first_line(e)}") from None


def run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, announce: bool = True,
        config_file: str | None = None) -> dict:  # fmt: skip
    """Run cfg.method in cfg.run_dir; returns {stage: {"val": best, "test": metrics}}. announce: print the
    table and where the outputs are at the end. config_file: the --config file the options came from (an
    input that --overwrite must not delete)."""
    run_dir = Path(cfg.run_dir)
    D.init_from_env(cfg.device)
    cfg = dataclasses.replace(cfg, device=D.local_device(cfg.device))  # under torchrun: the rank's own GPU
    if D.active() and cfg.batch_size % D.world():
        raise ConfigError(f"batch-size: {cfg.batch_size} is not divisible by the {D.world()} torchrun processes")
    # nothing is written before every input is validated
    check_run_dir(run_dir, resume, overwrite, input_paths(cfg, config_file))
    splits = load_splits(cfg)
    train, _, test, num_classes = splits
    if cfg.autoattack and num_classes < 4:
        raise ConfigError(f"autoattack: AutoAttack {cfg.autoattack}'s DLR loss needs at least 4 classes; this task has "
                          f"{num_classes} (drop --autoattack: PGD still runs)")  # fmt: skip
    in_chans = train.x.shape[1] if isinstance(train, ArrayData) else 3

    checkpoint = checkpoint_of(cfg)
    logged = False

    def fresh(quiet: bool = False):
        # Every stage that does not continue another starts here: the backbone's weights and a fresh head
        # (the same random head for each, from the seed). The log says so once.
        nonlocal logged
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, num_classes, in_chans, checkpoint, quiet=quiet or logged)
        logged = logged or not quiet
        return model

    # Everything is validated before the run directory is touched: the model, its checkpoint (and the head
    # rules), the PEFT method's fit to this model, a head checkpoint to start from, an unchanged run to resume.
    probe = fresh(quiet=True)
    if not resume:  # a run of an earlier version resumes as it was configured
        check_backbone(cfg, checkpoint)
    if cfg.method in ("ft", "roli"):
        apply_run_peft(cfg, probe)
    shape = tuple(train.x.shape[1:]) if isinstance(train, ArrayData) else (3, cfg.crop_size, cfg.crop_size)
    check_forward(probe, shape, cfg.model)
    if cfg.method == "ft" and cfg.init not in ("random", "lp", "alp"):
        load_init(cfg, fresh(quiet=True), cfg.init)
    del probe
    fp = fingerprint(cfg, splits, getattr(train, "classes", None))
    if resume:
        check_fingerprint(run_dir, fp, "resume")
    D.barrier()  # every rank has validated before rank 0 touches the run directory
    lock = None
    try:
        if D.is_main():
            if run_dir.is_dir():  # before --overwrite deletes anything: no other process is using it
                lock = RunLock(run_dir, f"roli train --method {cfg.method}").acquire()
            prepare_run_dir(run_dir, resume, overwrite)
            lock = lock or RunLock(run_dir, f"roli train --method {cfg.method}").acquire()
            save_json(config_record(cfg, {"validation": getattr(splits[1], "origin", None)}), run_dir / "config.json")
            if not resume:
                write_fingerprint(run_dir, fp)
            if getattr(train, "classes", None) is not None:  # the label -> class mapping the run trained with
                save_json({"classes": list(train.classes), "note": "class i is the i-th entry (the dataset's label)"},
                          run_dir / "labels.json")  # fmt: skip
        D.barrier()
        _log_to(run_dir / "train.log")
        log.info("run directory: %s; device: %s", run_dir, cfg.device)
        results = run_stages(cfg, run_dir, splits, fresh, resume)
    except OSError as e:
        if (full := disk_full(e, run_dir)) is not None:
            raise full from None
        raise
    finally:
        if lock is not None:
            lock.release()
    if D.is_main() and announce:
        print(render(results, cfg))
        print(f"outputs: {run_dir} (results.json, config.json, train.log; per stage: best.pt, metrics.jsonl, "
              f"curves.png). Next: roli evaluate --run {run_dir} --autoattack standard, "
              f"roli report {run_dir}")  # fmt: skip
    return results


def run_stages(cfg: TrainConfig, run_dir: Path, splits, fresh, resume: bool) -> dict:
    """The stages of cfg.method in order, each evaluated on the test set as it finishes (results.json)."""
    test = splits[2]
    results = {}

    def finish(name, model, best):
        stage = stage_dir(name)
        test_metrics = evaluate_test(cfg, model, test, run_dir / "autoattack" / stage)
        results[name] = {"val": best, "test": test_metrics, "dir": stage}
        if D.is_main():
            save_json(results, run_dir / "results.json")

    m = cfg.method
    if m == "pretrain":
        model = fresh()
        apply_peft(model, "full")
        finish("pretrain", model, train_full(cfg, "pretrain", model, splits, run_dir / "pretrain", resume))
    elif m == "lp":
        model = fresh()
        finish("lp", model, linear_probe(cfg, model, splits, run_dir / "lp"))
    elif m == "alp":
        model = fresh()
        finish("alp", model, train_alp(cfg, model, splits, run_dir / "alp", resume))
    elif m == "ft":
        model = fresh()
        if cfg.init == "lp":
            finish("lp", model, linear_probe(cfg, model, splits, run_dir / "lp"))
        elif cfg.init == "alp":
            finish("alp", model, train_alp(cfg, model, splits, run_dir / "alp", resume))
        elif cfg.init != "random":
            load_init(cfg, model, cfg.init)
        apply_run_peft(cfg, model)
        name = cfg.stage_name or f"ft ({cfg.peft}, init {Path(cfg.init).name})"
        finish(name, model, train_full(cfg, "ft", model, splits, run_dir / stage_dir(name), resume))
    else:  # roli
        model = fresh()
        finish("alp", model, train_alp(cfg, model, splits, run_dir / "alp", resume))
        apply_run_peft(cfg, model)
        finish(f"RoLI-{cfg.peft}", model, train_full(cfg, "ft", model, splits, run_dir / "roli-ft", resume))
        if cfg.compare_ranli:
            model = fresh()
            apply_run_peft(cfg, model)
            finish(f"RanLI-{cfg.peft}", model, train_full(cfg, "ranli", model, splits, run_dir / "ranli-ft", resume))
    return results


def config_record(cfg: TrainConfig, data: dict | None = None) -> dict:
    """config.json: the options (what --resume and --config read back), plus records that they skip: the
    settings each stage resolved to, the data splits used, the versions and the command line."""
    import roli

    return {**cfg.to_dict(), "_resolved": cfg.resolved(), "_data": data or {},
            "_versions": {"roli": roli.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "_command": [Path(sys.argv[0]).name, *sys.argv[1:]]}  # fmt: skip


def render(results: dict, cfg: TrainConfig) -> str:
    steps = f"PGD-{cfg.val_steps}"
    cols = ["stage", "train attack", "val clean", f"val {steps}", "test clean", f"test {steps}"] + (
        ["AutoAttack"] if cfg.autoattack else []
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    for name, r in results.items():
        v, t = r["val"], r["test"]
        cells = [
            name,
            v.get("train_attack", "-"),
            pct(v.get("val_clean")),
            pct(v.get("val_robust")),
            pct(t["clean"]),
            pct(t[f"pgd{cfg.val_steps}"]),
        ]
        if cfg.autoattack:
            cells.append(pct(t.get("autoattack")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _Stderr(logging.StreamHandler):
    """The console handler: writes to whatever sys.stderr is when a record is emitted (a later redirection,
    or a closed stream of an earlier in-process run, never swallows or breaks the log)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the current sys.stderr always wins
        pass


def _log_to(path: Path) -> None:
    root = logging.getLogger("roli")
    root.setLevel(logging.INFO if D.is_main() else logging.WARNING)  # rank-0-only logging
    if not D.is_main():
        return
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        console = _Stderr()
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(fh)
