"""The catastrophic-overfitting guard of single-step adversarial training (FGSM-RS, N-FGSM).

Single-step training can collapse within a few hundred steps: accuracy under the single-step attack rises
while accuracy under PGD falls to near zero (Wong et al. 2020; de Jorge et al. 2022). The guard measures both
on a fixed batch of validation images (a short seeded PGD-5, and the training attack with a fixed seed) at
the start of the stage, every `every` steps and at each epoch end. The model and optimiser state of the
last check that did not collapse are kept. A check collapses when its PGD accuracy is more than `drop`
below the best PGD accuracy seen so far while its single-step accuracy is at least what it was at that best
check (when both fall, the model got worse in general, which restoring would not cure);
then the last good state is restored and the rest of the stage trains with PGD-k (the run's --steps and
--step-size). The event is logged, recorded in metrics.jsonl and named in the final table.

Checks use their own seeded generators and eval mode: they draw nothing from the training's random streams,
so a run whose guard never fires trains exactly as it would without the guard. Under torchrun each rank
checks its share of the batch and the counts are summed, so every rank takes the same decision.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from roli import _dist as D
from roli._amp import autocast_for
from roli.attacks import PGD, attack_mode

log = logging.getLogger("roli.train")
PROBE_STEPS = 5  # the guard's PGD: 5 steps of 2.5 eps / 5 from a random start


def trained_state(model: torch.nn.Module) -> dict:
    """A copy of what training changes: the trainable parameters and the buffers."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad] + list(model.named_buffers())
    return {k: t.detach().clone() for k, t in named}


def first_images(val, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a validation set ((x, y) tensors or an iterable of batches), this rank's
    share under torchrun (the validation batches are already sharded)."""
    if isinstance(val, tuple):
        x, y = val
        return x[:n], y[:n]
    xs, ys, have = [], [], 0
    for x, y in val:
        xs.append(x[: n - have])
        ys.append(y[: n - have])
        have += len(ys[-1])
        if have >= n:
            break
    return torch.cat(xs), torch.cat(ys)


class Guard:
    """See the module docstring. `single()` makes the training attack with a fixed seed; `fallback()` returns
    the (step function, PGD-k attack) the stage continues with after a collapse; `label`/`fallback_label`
    name them in logs and tables."""

    def __init__(
        self,
        *,
        every: int,
        drop: float,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        precision: str,
        seed: int,
        single: Callable[[], PGD],
        fallback: Callable[[], tuple[Callable, PGD]],
        label: str,
        fallback_label: str,
    ):
        self.every, self.drop, self.x, self.y, self.eps = every, drop, x, y, eps
        self.precision, self.seed, self.single, self.fallback = precision, seed, single, fallback
        self.label, self.fallback_label = label, fallback_label
        self.best: dict | None = None  # the check with the highest PGD accuracy so far
        self.good: dict | None = None  # {"epoch", "step", "pgd", "single"} of the last good check
        self.last: dict | None = None  # the latest check
        self.event: dict | None = None  # the collapse, once it happened
        self.checks = 0
        self._snapshot: dict | None = None

    @property
    def active(self) -> bool:
        return self.event is None

    def due(self, step: int, last_step: bool) -> bool:
        return self.active and (last_step or step % self.every == 0)

    def measure(self, model: torch.nn.Module) -> tuple[float, float]:
        """(PGD-5 accuracy, single-step accuracy) on the guard's batch, summed over ranks."""
        probe = PGD(
            model,
            eps=self.eps,
            step_size=2.5 * self.eps / PROBE_STEPS,
            steps=PROBE_STEPS,
            early_stop=True,
            precision=self.precision,
            seed=self.seed,
        )
        res = probe.perturb(self.x, self.y)
        x_single = self.single()(self.x, self.y)
        with attack_mode(model) as m, torch.no_grad(), autocast_for(self.x.device, self.precision):
            single_ok = m(x_single).argmax(1) == self.y
        clean_ok = ~res.clean_success  # the probe's first iterate (early_stop): no second clean forward
        robust, single, n = D.sum_(int((clean_ok & ~res.success).sum()), int(single_ok.sum()), len(self.y))
        return robust / max(n, 1), single / max(n, 1)

    def check(self, stage, epoch: int, step: int) -> dict | None:
        """Measure; keep the state as the last good one, or restore it and switch the stage to PGD-k.
        Returns the collapse event, if this check found one."""
        pgd, single = self.measure(stage.model)
        self.checks += 1
        self.last = {"epoch": epoch, "step": step, "pgd": pgd, "single": single}
        best = self.best
        if best is not None and best["pgd"] - pgd > self.drop and single >= best["single"]:
            self.event = {"epoch": epoch, "step": step, "pgd": pgd, "single": single, "best_pgd": best["pgd"],
                          "restored": {"epoch": self.good["epoch"], "step": self.good["step"]},
                          "from": self.label, "to": self.fallback_label}  # fmt: skip
            self._restore(stage)
            stage.step, stage.attack = self.fallback()
            log.warning(
                "%s: catastrophic overfitting at epoch %d step %d (guard PGD-%d accuracy %.3f, best %.3f; "
                "%s accuracy %.3f, %.3f at the best): restored the state of epoch %d step %d and continuing "
                "with %s",
                stage.name,
                epoch,
                step,
                PROBE_STEPS,
                pgd,
                best["pgd"],
                self.label,
                single,
                best["single"],
                self.good["epoch"],
                self.good["step"],
                self.fallback_label,
            )
            self._snapshot = None
            return self.event
        if best is None or pgd > best["pgd"]:
            self.best = self.last
        self.good = self.last
        self._snapshot = self._take(stage)
        return None

    def _restore(self, stage) -> None:
        opt = stage.optimizer
        lrs = [g["lr"] for g in opt.param_groups]  # the schedule's current rates stay
        stage.model.load_state_dict(self._snapshot["model"], strict=False)
        opt.load_state_dict(self._snapshot["optimizer"])
        for g, lr in zip(opt.param_groups, lrs, strict=True):
            g["lr"] = lr

    def summary(self) -> str:
        """The training attack as the final table names it."""
        if self.event is None:
            return self.label
        e = self.event
        return f"{self.label} -> {self.fallback_label} (guard: epoch {e['epoch']} step {e['step']})"

    def state(self, with_snapshot: bool) -> dict:
        """What a resumed run needs. At an epoch end the last good state is the saved state itself (the epoch
        ends with a check), so the snapshot is written only for a save in the middle of an epoch."""
        snapshot = self._snapshot if with_snapshot and self.active else None
        return {
            "best": self.best,
            "good": self.good,
            "last": self.last,
            "event": self.event,
            "checks": self.checks,
            "snapshot": snapshot,
        }

    def load(self, state: dict | None, stage) -> None:
        """Restore state() after the stage's model and optimiser were loaded (switching to PGD-k if the run had)."""
        if state is None:
            return
        self.best, self.good, self.last = state["best"], state["good"], state["last"]
        self.event, self.checks = state["event"], state["checks"]
        if self.event is not None:
            stage.step, stage.attack = self.fallback()
            return
        snap = state["snapshot"]
        self._snapshot = snap if snap is not None else self._take(stage)

    @staticmethod
    def _take(stage) -> dict:
        return {"model": trained_state(stage.model), "optimizer": copy.deepcopy(stage.optimizer.state_dict())}
