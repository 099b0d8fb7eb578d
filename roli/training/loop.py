"""The epoch loop shared by pretraining, ALP and finetuning: runs that lose nothing.

- `last.pt` (model, optimizer, epoch/step, torch and attack RNG states, best so far, history) is written
  atomically after every epoch and when a SIGINT/SIGTERM arrives (after the current step finishes);
  `best.pt` holds the best model by validation robust accuracy. A resumed run restores all of it and
  skips the steps already taken in the interrupted epoch (the data order is a function of seed and
  epoch), so it ends where an uninterrupted run would.
- metrics.jsonl is rewritten from the history at every epoch, so a resumed run never duplicates lines.
- A non-finite loss stops the run with an error; the last good checkpoint stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from roli import _dist as D
from roli import _env
from roli._amp import autocast_for
from roli._cli import BadValue
from roli._io import atomic_write, first_line, load_tagged, save_torch
from roli.attacks import PGD
from roli.attacks.accuracy import validation_counts
from roli.config import OPTIMIZERS, REF_ADAMW_EPS, SELECT_BY
from roli.features.alp_step import alp_step, backward, micro_batches, tally, update, weighted
from roli.models import load_checkpoint, save_checkpoint
from roli.rundir import check_written_here, run_identity
from roli.schedule import warmup_cosine
from roli.training.guard import Guard, trained_state

STATE_FORMAT = "roli-train-state"
log = logging.getLogger("roli.train")


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    def __init__(self, signum: int, where: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.where = signum, where


# (x, y) -> (loss, correct count): 0-dim tensors on the device (no host synchronisation), or numbers.
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | float, torch.Tensor | int]]


@dataclass(kw_only=True)
class Stage:
    """One trained stage. What kind of stage it is lives in `step` (see alp_stage_step, ft_stage_step):
    the loop never asks for its name, which only labels logs, metrics and checkpoints."""

    name: str
    model: torch.nn.Module  # what is validated and checkpointed (never a DDP/compiled wrapper)
    step: StepFn  # one training step on a batch
    train: object  # a loader with set_epoch; yields (x in [0, 1], y)
    val: object  # (x, y) tensors or an iterable of batches
    optimizer: torch.optim.Optimizer
    epochs: int
    warmup: int
    attack: PGD | None  # the training attack (its random-start generator is saved and restored)
    eps: float
    step_size: float
    val_steps: int
    precision: str = "fp32"
    seed: int = 0
    norm: str = "linf"  # of the validation attack (the run's threat model)
    attack_label: str = ""  # the training attack's name in logs and tables (PGD-7, FGSM-RS, ...)
    select_by: str = "pgd"  # the best epoch by: pgd (roli's per-example worst case) | reference-pgd
    guard: Guard | None = None  # the catastrophic-overfitting guard of single-step training
    history: list[dict] = field(default_factory=list)
    on_epoch: Callable[[dict], None] | None = None  # receives each epoch's record (main process; --log trackers)
    scaler: torch.amp.GradScaler | None = None  # fp16's (its scale is saved and restored with the stage)


class StopOnSignal:
    """While active, SIGINT/SIGTERM only set a flag; the loop checks it after each step."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def make_optimizer(params_groups, kind: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """SGD (momentum), AdamW, or the RoLI reference's AdamW ("adamw-ref": eps 1e-6), with torch's fused
    single-pass kernel where it runs (float parameters on CPU or CUDA: on resnet18's 11.7M parameters the AdamW
    step takes 7 ms instead of 41 ms on a 2-core CPU)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer {kind!r} is not one of {', '.join(OPTIMIZERS)}")
    cls, extra = {
        "sgd": (torch.optim.SGD, {"momentum": momentum}),
        "adamw": (torch.optim.AdamW, {}),
        "adamw-ref": (torch.optim.AdamW, {"eps": REF_ADAMW_EPS}),
    }[kind]
    params = [p for g in params_groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    try:
        opt = cls(params_groups, lr=lr, fused=fused or None, **extra)
    except (RuntimeError, ValueError):  # this torch build has no fused kernel for these parameters
        opt = cls(params_groups, lr=lr, **extra)
    for g in opt.param_groups:
        g["base_lr"] = lr
    return opt


def param_groups(model, weight_decay: float, optimizer: str = "adamw") -> list[dict]:
    """The trainable parameters in two groups, decayed and not, by the optimiser's rule:
    - "adamw-ref": the RoLI reference's AdamW groups: no decay for every parameter whose name contains "bias"
      (Swin's relative_position_bias_table too), `weight_decay` for all others (the reference hard-codes 0.01).
    - "sgd", "adamw": weights (ndim >= 2) decayed; biases, norms, prompts' gates not (torch/timm convention).
      For the reference's SGD stage, ALP (the head alone trains), this is its rule: decay on the head's weight,
      none on its bias."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer == "adamw-ref":
        skip = {n for n, _ in named if "bias" in n}
    else:
        skip = {n for n, p in named if p.dim() < 2}
    decay = [p for n, p in named if n not in skip]
    rest = [p for n, p in named if n in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def ft_step(
    net,
    attack: PGD | None,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str = "fp32",
    scaler=None,
    accumulate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adversarial training step of every trainable parameter: the attack (which unwraps DDP: no
    all-reduce inside it; None trains on x), then forward/backward/update of `net` in train mode. With
    `accumulate` > 1 the batch runs as that many micro-batches (attack, forward, backward each; DDP all-reduces
    only the last) and one update; `scaler`: fp16's GradScaler. Returns (loss, correct count) as 0-dim tensors on
    the device (reading them would synchronise)."""
    opt.zero_grad(set_to_none=True)
    parts = list(micro_batches(x, y, accumulate))
    acc = None
    for i, (xi, yi, w) in enumerate(parts):
        x_in = attack(xi, yi) if attack is not None else xi
        net.train()
        quiet = net.no_sync() if i < len(parts) - 1 and hasattr(net, "no_sync") else contextlib.nullcontext()
        with quiet:
            with autocast_for(xi.device, precision):
                logits = net(x_in)
            loss = weighted(F.cross_entropy(logits.float(), yi), w)
            backward(loss, scaler)
        acc = tally(acc, loss, (logits.argmax(1) == yi).sum())
    update(opt, scaler)
    return acc


def alp_stage_step(model, attack: PGD, opt: torch.optim.Optimizer, precision: str = "fp32", scaler=None,
                   accumulate: int = 1) -> StepFn:  # fmt: skip
    """The step of an ALP stage: the attack through the frozen model, then the head update (its gradients
    averaged over torchrun ranks: the head trains outside any DDP forward)."""
    head = list(model.head.parameters())

    def step(x, y):
        return alp_step(model, attack, opt, x, y, precision, lambda: D.average_grads(head), scaler, accumulate)

    return step


def ft_stage_step(net, attack: PGD | None, opt: torch.optim.Optimizer, precision: str = "fp32", scaler=None,
                  accumulate: int = 1) -> StepFn:  # fmt: skip
    """The step of a pretraining or finetuning stage: every trainable parameter of `net` (the DDP or
    compiled wrapper where there is one) on the attack's examples."""

    def step(x, y):
        return ft_step(net, attack, opt, x, y, precision, scaler, accumulate)

    return step


def _state(stage: Stage, epoch: int, step: int, best: dict, partial=(0, 0.0, 0)) -> dict:
    """The resumable state (a collective under torchrun: every rank contributes its RNG states). A save in
    the middle of an epoch (step > 0) carries the guard's last good state too."""
    attack_rng = stage.attack.rng_state() if stage.attack is not None else None
    rngs = D.gather_objects((torch.get_rng_state(), attack_rng, list(partial)))
    guard = stage.guard.state(with_snapshot=step > 0) if stage.guard is not None else None
    return {"format": STATE_FORMAT, "stage": stage.name, "epoch": epoch, "step": step,
            "model": stage.model.state_dict(), "optimizer": stage.optimizer.state_dict(),
            "torch_rng": [r[0] for r in rngs], "attack_rng": [r[1] for r in rngs],
            "best": best, "history": stage.history, "partial": [r[2] for r in rngs], "guard": guard,
            "scaler": stage.scaler.state_dict() if stage.scaler is not None else None}  # fmt: skip


def _save_state(state: dict, path: Path) -> None:
    if D.is_main():  # with the run's identity: a last.pt copied into another run is refused there
        save_torch(state | {"run": run_identity(path.parent.parent)}, path)
    D.barrier()


def _validate(stage: Stage) -> tuple[float, float, float]:
    """Clean, PGD and the reference's PGD scoring accuracy on the validation set (each rank attacks its shard),
    reduced over ranks."""
    t = validation_counts(
        stage.model,
        stage.val,
        stage.eps,
        stage.step_size,
        stage.val_steps,
        stage.precision,
        stage.seed,
        stage.norm,
        batch_ids=getattr(stage.val, "ids", None),
    )
    clean, robust, ref, n = D.sum_(t["clean"], t["pgd"], t["pgd_reference"], t["n"])
    return clean / max(n, 1), robust / max(n, 1), ref / max(n, 1)


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    atomic_write(
        run_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in history))
    )


def fit(
    stage: Stage,
    run_dir: Path | None,
    resume: bool = False,
    progress: bool | None = None,
    report: Callable[[str], None] | None = None,
) -> dict:
    """Train `stage` for its epochs, selecting the model by validation robust accuracy; afterwards
    stage.model holds the best model. Returns the best {"epoch", "val_clean", "val_robust"}.

    With a run_dir: last.pt / best.pt / metrics.jsonl there, resumable (`resume`), SIGINT/SIGTERM saved.
    With run_dir=None: nothing is written; the best weights are kept in memory.
    `report` receives the one-line summary of each epoch (default: the roli.train logger)."""
    report = report or log.info
    last = best_path = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        last, best_path = run_dir / "last.pt", run_dir / "best.pt"
    start_epoch, start_step, best = 0, 0, {"epoch": -1, "val_clean": 0.0, "val_robust": -1.0}
    best_state = None  # run_dir=None: the best model's trained tensors
    partial = (0, 0.0, 0)  # (seen, loss sum, correct) of an epoch interrupted mid-way
    ident = run_identity(run_dir.parent) if run_dir is not None else None  # the run's: carried by both files
    if resume and last is not None and last.exists():
        start_epoch, start_step, best, partial = _resume(stage, last)
    show = (progress if progress is not None else sys.stderr.isatty()) and D.is_main()
    if stage.guard is not None and stage.guard.good is None:  # the reference: the model the stage starts from
        stage.guard.check(stage, start_epoch, 0)
    with StopOnSignal() if run_dir is not None else contextlib.nullcontext(_NoSignal()) as stop:
        for epoch in range(start_epoch, stage.epochs):
            t0 = time.time()
            run = _EpochRun(stage, epoch, stop, last, best)
            tally = run.train(start_step, partial if epoch == start_epoch else (0, 0.0, 0), show, report)
            start_step = 0
            row = _end_epoch(stage, epoch, tally, time.time() - t0, report)
            if run_dir is not None and D.is_main():
                _write_metrics(run_dir, stage.history)
            if stage.on_epoch is not None and D.is_main():
                stage.on_epoch(row)
            key = SELECT_BY[stage.select_by]
            if row[key] > best.get(key, -1.0):
                best = {k: row[k] for k in ("val_clean", "val_robust", "val_robust_reference")} | {"epoch": epoch}
                if run_dir is None:
                    best_state = trained_state(stage.model)
                elif D.is_main():
                    save_checkpoint(stage.model, best_path, meta={"stage": stage.name, **best, "run": ident})
            if run_dir is not None:
                _save_state(_state(stage, epoch + 1, 0, best, (0, 0.0, 0)), last)
            if D.any_(stop.signum is not None):
                raise Interrupted(stop.signum or signal.SIGTERM, last)
    if run_dir is None:
        if best_state is not None:
            stage.model.load_state_dict(best_state, strict=False)
    else:
        D.barrier()
        meta = load_checkpoint(stage.model, best_path)
        check_written_here(meta.get("run"), run_dir.parent, best_path, "resume")
    return {**best, "train_attack": _attack_name(stage)}


def _resume(stage: Stage, last: Path) -> tuple[int, int, dict, tuple]:
    """Restore the stage from last.pt (model, optimiser, guard, RNG streams, history); returns (epoch, step,
    best, partial epoch's tally) to continue from."""
    try:
        state = load_tagged(last, STATE_FORMAT, "roli training state")
        check_written_here(state.get("run"), last.parent.parent, last, "resume")
        stage.model.load_state_dict(state["model"])
        stage.optimizer.load_state_dict(state["optimizer"])
        if stage.guard is not None:  # before the attack's RNG: a guarded run may have switched attacks
            stage.guard.load(state.get("guard"), stage)
        r = D.rank() if len(state["torch_rng"]) == D.world() else 0
        torch.set_rng_state(state["torch_rng"][r])
        if stage.attack is not None:
            stage.attack.set_rng_state(state["attack_rng"][r])
        if stage.scaler is not None and state.get("scaler"):
            stage.scaler.load_state_dict(state["scaler"])
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as e:
        raise BadValue(
            f"resume: {last} cannot be restored ({first_line(e)[:160]}); the run's config.json "
            "may have been edited, or the file is damaged: start a new run"
        ) from None
    stage.history = state["history"]
    log.info("resumed %s from %s at epoch %d, step %d", stage.name, last, state["epoch"], state["step"])
    return state["epoch"], state["step"], state["best"], tuple(state["partial"][r])


class _EpochRun:
    """One epoch's training steps, with its synchronisation points: every SYNC_STEPS steps, the epoch's end and
    each guard check read the device-side tally once, stop every rank on a non-finite loss or a signal
    (last.pt written mid-epoch), and run the guard."""

    def __init__(self, stage: Stage, epoch: int, stop, last: Path | None, best: dict):
        self.stage, self.epoch, self.stop, self.last, self.best = stage, epoch, stop, last, best

    def train(self, start_step: int, partial: tuple, show: bool, report) -> _Tally:
        stage, epoch = self.stage, self.epoch
        factor = warmup_cosine(epoch, stage.epochs, stage.warmup)
        for g in stage.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        if hasattr(stage.train, "set_epoch"):
            stage.train.set_epoch(epoch)
        tally = _Tally(*partial)
        n_steps = len(stage.train) if hasattr(stage.train, "__len__") else None
        ticker = _Progress(stage, report, n_steps, tally.seen)
        self.synced = start_step  # the last step whose flags were read
        for i, (x, y) in enumerate(_progress(stage.train, show, f"{stage.name} epoch {epoch}")):
            if i < start_step:
                continue
            try:
                loss, ok = stage.step(x, y)
            except ValueError as e:  # the attack found the model's outputs non-finite
                if "non-finite" not in str(e):
                    raise
                loss, ok = float("nan"), 0
            attack = stage.attack
            tally.add(loss, ok, len(y), attack.pop_invalid() if attack is not None and attack.config.deferred else None)
            if not show and D.is_main():
                ticker.tick(epoch, i + 1, tally)
            guard_due = stage.guard is not None and stage.guard.due(i + 1, i + 1 == n_steps)
            if guard_due or (i + 1) % SYNC_STEPS == 0 or i + 1 == n_steps:
                self._sync(i + 1, tally, guard_due)
        return tally

    def _sync(self, step: int, tally: _Tally, guard_due: bool) -> None:
        # The running sums stay on the device in between. One collective for both flags: a non-finite loss on
        # any rank stops every rank (no rank is left waiting in the next collective), and so does a signal.
        stage, stop, last = self.stage, self.stop, self.last
        bad = tally.read()[3]
        stopping, non_finite = (
            D.sum_(float(stop.signum is not None), float(bad > 0)) if D.active() else (stop.signum is not None, bad > 0)
        )
        if non_finite:
            good = last if last is not None and last.exists() else "none (first epoch)"
            raise NonFiniteLoss(
                f"{stage.name}: the loss became non-finite (NaN/inf; on this or another rank) at "
                f"epoch {self.epoch}, between steps {self.synced + 1} and {step}; the last good "
                f"checkpoint is {good}"
            )
        self.synced = step
        if guard_due:
            stage.guard.check(stage, self.epoch, step)
        if stopping:  # every rank stops after the same step
            _save_state(_state(stage, self.epoch, step, self.best, tally.read()[:3]), last)
            raise Interrupted(stop.signum or signal.SIGTERM, last)


def _end_epoch(stage: Stage, epoch: int, tally: _Tally, seconds: float, report) -> dict:
    """The epoch's row of metrics.jsonl: training loss and accuracy (summed over ranks), validation, the guard's
    checks; appended to stage.history and reported."""
    seen, loss_sum, correct = D.sum_(*tally.read()[:3])
    clean, robust, reference = _validate(stage)
    row = {"stage": stage.name, "epoch": epoch, "lr": stage.optimizer.param_groups[0]["lr"],
           "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen), "val_clean": clean,
           "val_robust": robust, "val_robust_reference": reference,
           "images_per_s": seen / max(seconds, 1e-9), "seconds": round(seconds, 3),
           "train_attack": _attack_name(stage)}  # fmt: skip
    guard = stage.guard
    if guard is not None:
        row["guard_checks"], row["guard_last"] = guard.checks, guard.last
        if guard.event is not None and guard.event["epoch"] == epoch:
            row["guard_event"] = guard.event
    stage.history.append(row)
    report(
        f"{stage.name} epoch {epoch}: loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, val clean "
        f"{clean:.4f}, val PGD-{stage.val_steps} {robust:.4f} (reference scoring {reference:.4f}), "
        f"{row['images_per_s']:.1f} img/s"
    )
    return row


def _attack_name(stage: Stage) -> str:
    return stage.guard.summary() if stage.guard is not None else stage.attack_label


class _NoSignal:
    signum = None


SYNC_STEPS = 32  # steps between the loop's host synchronisations (flags, signal), besides epoch ends and guard checks


class _Tally:
    """The running sums of an epoch's steps (loss sum, correct count, non-finite or invalid steps), kept on the
    device the steps produce them on: no host synchronisation per step. read() synchronises once."""

    def __init__(self, seen: int = 0, loss_sum: float = 0.0, correct: int = 0):
        self.seen = seen  # images, counted on the host
        self.base = torch.tensor([loss_sum, correct, 0.0], dtype=torch.float64)
        self.acc: torch.Tensor | None = None

    def add(self, loss, ok, n: int, invalid: torch.Tensor | None = None) -> None:
        self.seen += n
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().double()
            v = torch.stack(
                [loss * n, torch.as_tensor(ok, device=loss.device).double(), (~torch.isfinite(loss)).double()]
            )
        else:
            v = torch.tensor([loss * n, float(ok), 0.0 if math.isfinite(loss) else 1.0], dtype=torch.float64)
        if invalid is not None:
            v = v.to(invalid.device)
            v[2] += invalid.double()
        # The first step adds to the resumed partial sums: one sequence of additions, as without the interruption.
        self.acc = self.base.to(v.device) + v if self.acc is None else self.acc + v.to(self.acc.device)

    def read(self) -> tuple[int, float, int, float]:
        """(seen, loss sum, correct, non-finite steps) on the host."""
        loss_sum, correct, bad = (self.base if self.acc is None else self.acc).tolist()
        return self.seen, loss_sum, int(round(correct)), bad


class _Progress:
    """Off a terminal (a cluster job's log), one line at most every ROLI_PROGRESS_SECONDS inside an epoch:
    step, mean loss, images/s, the epoch's ETA, and the peak GPU memory on CUDA."""

    def __init__(self, stage: Stage, report, steps: int | None, seen0: int):
        self.stage, self.report, self.steps, self.seen0 = stage, report, steps, seen0
        self.every = _env.progress_seconds()
        self.t0 = self.last = time.time()
        self.done = 0  # steps taken in this process (a resumed epoch starts mid-way)

    def tick(self, epoch: int, step: int, tally: _Tally) -> None:
        self.done += 1
        now = time.time()
        if now - self.last < self.every:
            return
        self.last = now
        seen, loss_sum, _, _ = tally.read()  # the only host synchronisation of the line
        rate = (seen - self.seen0) / max(now - self.t0, 1e-9)
        line = f"{self.stage.name} epoch {epoch} step {step}" + (f"/{self.steps}" if self.steps else "")
        line += f": loss {loss_sum / max(seen, 1):.4f}, {rate:.1f} img/s"
        if self.steps:
            per_step = (now - self.t0) / self.done
            line += f", epoch ETA {max(0.0, (self.steps - step) * per_step):.0f} s"
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            line += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        self.report(line)


def _progress(loader, show: bool, desc: str):
    if not show:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, total=len(loader) if hasattr(loader, "__len__") else None)
