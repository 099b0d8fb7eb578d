"""Experiment tracking: every metrics.jsonl record of a run, also through the trackers users already read
(`roli train --log tensorboard --log wandb --log csv`).

- tensorboard: torch.utils.tensorboard's SummaryWriter into RUN_DIR/tensorboard (`tensorboard --logdir runs`),
  one scalar per number of the record, tagged "<stage>/<key>", at step = the epoch; the final test figures as
  "<stage>/test_<key>".
- wandb: one Weights & Biases run per roli run (its id kept in RUN_DIR/tracking.json, so --resume continues it),
  files under RUN_DIR/wandb; offline mode (`wandb sync` later) when WANDB_MODE says so or api.wandb.ai cannot be
  reached, so a machine without network never waits on it.
- csv: STAGE/metrics.csv beside metrics.jsonl, rewritten from the stage's history each epoch (as metrics.jsonl
  is: a resumed run never duplicates a row).

The libraries are optional (`pip install roli[tracking]` installs tensorboard and wandb); asking for one that is
not installed is refused before the run starts.
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
from pathlib import Path

from roli._cli import BadValue
from roli._io import atomic_write, note_written, save_json
from roli.config import TRACKERS

WANDB_HOST = ("api.wandb.ai", 443)


def check_trackers(kinds: list[str]) -> None:
    """Each --log value known and its library importable: checked before anything is written."""
    for kind in kinds:
        if kind not in TRACKERS:
            raise BadValue(f"log: {kind!r} is not one of {', '.join(TRACKERS)}")
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                raise BadValue(f"log: {kind} needs the {module} package: pip install {module}") from None


def _scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record (booleans and nested mappings' numbers too), by key."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Real):
            out[f"{prefix}{key}"] = float(value)
    return out


class Trackers:
    """The trackers of one run (main process only): epoch(row, history, stage_dir) after each epoch,
    test(stage, figures) after each stage's test evaluation, close() at the end."""

    def __init__(self, kinds: list[str], run_dir: Path, config: dict, resume: bool):
        self.kinds, self.run_dir = list(dict.fromkeys(kinds)), Path(run_dir)
        self.tb = self.wandb = None
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            note_written(self.tb.file_writer.event_writer._file_name)  # appended to by TensorBoard's writer
        if "wandb" in self.kinds:
            self.wandb = _start_wandb(self.run_dir, config, resume)

    def epoch(self, row: dict, history: list[dict], stage_dir: Path | None) -> None:
        stage, epoch = row.get("stage", "stage"), int(row.get("epoch", 0))
        values = {k: v for k, v in _scalars(row).items() if k != "epoch"}
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{stage}/{key}", value, epoch)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{stage}/{k}": v for k, v in values.items()} | {f"{stage}/epoch": epoch})
        if "csv" in self.kinds and stage_dir is not None:
            write_csv(stage_dir / "metrics.csv", history)

    def test(self, stage: str, figures: dict) -> None:
        values = _scalars(figures)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{stage}/test_{key}", value, 0)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.summary.update({f"{stage}/test_{k}": v for k, v in values.items()})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_csv(path: Path, history: list[dict]) -> None:
    """A stage's epochs as CSV (every key any epoch has; nested values as JSON), written atomically."""
    columns = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for row in history:
                w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})

    atomic_write(path, write)


def _start_wandb(run_dir: Path, config: dict, resume: bool):
    import wandb

    from roli import _env

    ids = run_dir / "tracking.json"
    saved = {}
    if resume and ids.is_file():
        try:
            saved = json.loads(ids.read_text())
        except (ValueError, UnicodeDecodeError):
            saved = None
    run_id = saved.get("wandb_id") if isinstance(saved, dict) and isinstance(saved.get("wandb_id"), str) else None
    if resume and ids.is_file() and run_id is None:
        logging.getLogger("roli.train").warning(
            "tracking: %s names no wandb run; the resumed run logs to a new one", ids
        )
    run_id = run_id or wandb.util.generate_id()
    mode = _env.wandb_mode() or ("online" if _env.reachable(*WANDB_HOST) else "offline")
    save_json({"wandb_id": run_id, "wandb_mode": mode}, ids)
    (run_dir / "wandb").mkdir(exist_ok=True)
    note_written(run_dir / "wandb", "tree")  # filled by wandb itself
    return wandb.init(
        project=_env.wandb_project(),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config={k: v for k, v in config.items() if not k.startswith("_")},
    )
