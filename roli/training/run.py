"""One run of `python -m roli.train`: each method's stages in order, the final table, the run's log.

roli.train parses flags into a TrainConfig and calls run(); the built-in demonstration
(roli.training.demo) calls run() too.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

from roli import _dist as D
from roli._cli import BadValue
from roli._io import first_line, note_written, save_json
from roli.config import TrainConfig
from roli.features.cache import check_root as check_cache_root
from roli.models import apply_peft, what_trains
from roli.rundir import (
    check_fingerprint,
    check_run_dir,
    disk_full,
    fingerprint,
    hash_note,
    open_run_dir,
    stage_dir,
    write_fingerprint,
)
from roli.training.pipeline import Stages, check_forward, load_init
from roli.training.tracking import Trackers, check_trackers

log = logging.getLogger("roli.train")


def run(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    announce: bool = True,
    config_file: str | None = None,
) -> dict:
    """Run cfg.method in cfg.run_dir; returns {stage: {"val": best, "test": metrics}}. announce: print the
    table and where the outputs are at the end. config_file: the --config file the options came from (an
    input that --overwrite must not delete)."""
    run_dir = Path(cfg.run_dir)
    D.init_from_env(cfg.device)
    cfg = dataclasses.replace(cfg, device=D.local_device(cfg.device))  # under torchrun: the rank's own GPU
    splits, fresh, fp, hashed = _validate(cfg, run_dir, resume, overwrite, config_file)
    train = splits[0]
    D.barrier()  # every rank has validated before rank 0 touches the run directory
    lock = trackers = None
    try:
        if D.is_main():

            def first(folder: Path) -> None:  # the files a run is resumed from, written before any other
                if not resume:
                    write_fingerprint(folder, fp)
                save_json(cfg.record({"validation": getattr(splits[1], "origin", None)}), folder / "config.json")
                if getattr(train, "classes", None) is not None:  # the label -> class mapping the run trained with
                    save_json(
                        {"classes": list(train.classes), "note": "class i is the i-th entry (the dataset's label)"},
                        folder / "labels.json",
                    )

            lock = open_run_dir(run_dir, resume, overwrite, f"roli train --method {cfg.method}", first)
        D.barrier()
        _log_to(run_dir / "train.log")
        log.info("run directory: %s; device: %s", run_dir, cfg.device)
        if hashed:
            log.info(hashed)
        stages = Stages(cfg, splits)
        if cfg.log and D.is_main():
            stages.trackers = trackers = Trackers(cfg.log, run_dir, cfg.to_dict(), resume)
            log.info("tracking: %s", ", ".join(cfg.log))
        results = run_stages(stages, run_dir, fresh, resume)
    except OSError as e:
        if (full := disk_full(e, run_dir)) is not None:
            raise full from None
        raise
    finally:
        if trackers is not None:
            trackers.close()
        if lock is not None:
            lock.release()
    if D.is_main() and announce:
        print(render(results, cfg.val_steps, cfg.autoattack is not None))
        print(
            f"outputs: {run_dir} (results.json, config.json, train.log; per stage: best.pt, metrics.jsonl, "
            f"curves.png). Next: roli evaluate --run {run_dir} --autoattack standard, "
            f"roli report {run_dir}"
        )
    return results


def _validate(cfg: TrainConfig, run_dir: Path, resume: bool, overwrite: bool, config_file: str | None):
    """Every input checked before anything is written: the run directory, the data, the model and its
    weights (and the head rules), the PEFT method's fit to this model, one forward at the data's size, a head
    checkpoint to start from, an unchanged run to resume. Returns (splits, fresh, fingerprint, the log line of
    hashing the data): fresh(quiet)
    builds the model every stage that does not continue another starts from."""
    if D.active() and cfg.batch_size % D.world():
        raise BadValue(f"batch-size: {cfg.batch_size} is not divisible by the {D.world()} torchrun processes")
    check_run_dir(run_dir, resume, overwrite, cfg.inputs(config_file))
    check_trackers(cfg.log)
    if cfg.method == "lp" or cfg.method == "ft" and cfg.init == "lp":  # the stages that go through the feature cache
        try:
            check_cache_root()
        except ValueError as e:
            raise BadValue(str(e)) from None
    splits = cfg.data_spec.load()
    train, _, _, num_classes = splits
    if cfg.autoattack and num_classes < 4:
        raise BadValue(
            f"autoattack: AutoAttack {cfg.autoattack}'s DLR loss needs at least 4 classes; this task has "
            f"{num_classes} (drop --autoattack: PGD still runs)"
        )
    model_spec = cfg.model_spec
    weights = model_spec.weights()  # the backbone's file (a registry name resolved): hashed below, not read
    inputs = {"--checkpoint": weights, "--config": config_file}
    if cfg.init not in ("random", "lp", "alp"):
        inputs["--init"] = cfg.init
    t0 = time.perf_counter()
    try:  # image files: every one read, hashed and checked to be an image (--data-hash full)
        fp = fingerprint(cfg.to_dict(), splits, getattr(train, "classes", None), {k: v for k, v in inputs.items() if v})
    except ValueError as e:
        raise BadValue(f"dataset: {first_line(e)}; remove or replace the file(s)") from None
    hashed = hash_note(splits, cfg.data_hash, time.perf_counter() - t0)
    if resume:  # before anything is built from the (possibly edited) config.json
        check_fingerprint(run_dir, fp, "resume")
    shape = train.image_shape() or (3, cfg.crop_size, cfg.crop_size)
    logged = False

    def fresh(quiet: bool = False):
        # The backbone's weights and a fresh head (the same random head for each, from the seed); logged once.
        nonlocal logged
        torch.manual_seed(cfg.seed)
        model = model_spec.build(num_classes, shape[0], cfg.device, weights, quiet=quiet or logged)
        logged = logged or not quiet
        return model

    probe = fresh(quiet=True)
    if not resume:  # a run of an earlier version resumes as it was configured
        model_spec.check_weights(cfg.method, weights)
    if cfg.method in ("ft", "roli"):
        cfg.peft_spec.apply(probe, _role(cfg.method, cfg.init))
    check_forward(probe, shape, cfg.model)
    if cfg.method == "ft" and cfg.init not in ("random", "lp", "alp"):
        load_init(fresh(quiet=True), cfg.init)
    del probe
    return splits, fresh, fp, hashed


def run_stages(stages: Stages, run_dir: Path, fresh, resume: bool) -> dict:
    """The stages of the run's method in order, each evaluated on the test set as it finishes (results.json)."""
    cfg, results = stages.cfg, {}

    def finish(name, model, best, trains=None):
        stage = stage_dir(name)
        results[name] = {"val": best, "test": stages.test(model, run_dir / "autoattack" / stage), "dir": stage}
        if trains is not None:
            results[name]["trainable"] = trains
        if D.is_main():
            save_json(results, run_dir / "results.json")
            if stages.trackers is not None:
                stages.trackers.test(name, results[name]["test"])

    model = fresh()
    if cfg.method == "pretrain":
        apply_peft(model, "full")
        finish("pretrain", model, stages.full("pretrain", model, run_dir / "pretrain", resume))
    elif cfg.method == "lp" or cfg.method == "ft" and cfg.init == "lp":
        finish("lp", model, stages.linear_probe(model, run_dir / "lp"))
    elif cfg.method in ("alp", "roli") or cfg.method == "ft" and cfg.init == "alp":
        finish("alp", model, stages.alp(model, run_dir / "alp", resume))
    elif cfg.method == "ft" and cfg.init != "random":
        load_init(model, cfg.init)
    if cfg.method in ("ft", "roli"):
        cfg.peft_spec.apply(model, _role(cfg.method, cfg.init))
        name = (
            f"RoLI-{cfg.peft}"
            if cfg.method == "roli"
            else cfg.stage_name or f"ft ({cfg.peft}, init {Path(cfg.init).name})"
        )
        trains = _say_what_trains(name, model, cfg.peft_spec)
        finish(name, model, stages.full("ft", model, run_dir / stage_dir(name), resume), trains)
    if cfg.compare_ranli:
        model = fresh()
        cfg.peft_spec.apply(model, "ranli")
        trains = _say_what_trains(f"RanLI-{cfg.peft}", model, cfg.peft_spec)
        finish(f"RanLI-{cfg.peft}", model, stages.full("ranli", model, run_dir / "ranli-ft", resume), trains)
    return results


def _role(method: str, init: str) -> str:
    """The finetuning stage's role for the PEFT init: ranli from a random head, roli from a trained one."""
    return "ranli" if method == "ft" and init == "random" else "roli"


def _say_what_trains(name: str, model, peft) -> dict:
    """Log, at the start of a finetuning stage, which trainable parameters can receive a gradient (a PEFT branch
    zero on both sides cannot), and return the counts for results.json."""
    t = what_trains(model)
    like = ""
    if t["inert"] and peft.peft_init == "reference":
        like = f" (as the reference's {'RoLI' if name.startswith('RoLI') else 'RanLI'}-{peft.method})"
    log.info("%s, peft init %s: %s%s", name, peft.peft_init, t["summary"], like)
    return {k: t[k] for k in ("trainable", "receiving_gradient", "inert", "inert_tensors")} | {
        "peft_init": peft.peft_init
    }


def render(results: dict, val_steps: int, autoattack: bool) -> str:
    """The run's table: per stage, its training attack and its validation and test accuracies."""
    steps = f"PGD-{val_steps}"
    cols = ["stage", "train attack", "val clean", f"val {steps}", "test clean", f"test {steps}",
            f"test {steps} (ref. scoring)"] + (["AutoAttack"] if autoattack else [])  # fmt: skip
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
            pct(t[f"pgd{val_steps}"]),
            pct(t.get(f"pgd{val_steps}_reference")),
        ]
        if autoattack:
            cells.append(pct(t.get("autoattack")))
        lines.append("| " + " | ".join(cells) + " |")
    partial = next((r["test"] for r in results.values() if r["test"].get("n", 0) < r["test"].get("of", 0)), None)
    if partial:
        lines.append(
            f"(partial: the test figures are of the first {partial['n']} of {partial['of']} test images, --n-ex)"
        )
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
    note_written(path)  # appended to: --overwrite removes it by name
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(fh)
