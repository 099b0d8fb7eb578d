"""The one evaluator: clean accuracy, PGD (with restarts), an eps sweep and AutoAttack, per example, on batches
of a validation or test set sharded over torchrun ranks by batch.

The trainer's validation (every epoch), its test and `roli evaluate` all run `Evaluation.run`; they differ
only in what they ask for and how they print it. Each batch is attacked with its own seed (batch_seed of
its index in the whole set), so outcomes never depend on which process attacked a batch: a sharded
evaluation equals one process's, example by example. Definitions, in one place:

- clean: correct on the clean image. Where PGD runs, the clean image is PGD's first iterate (early stop:
  no second forward); otherwise one forward (clean_correct).
- pgd: correct on the clean image and on every PGD iterate of every restart (roli's figure: the per-example
  worst case, used for model selection by default).
- pgd_reference: the RoLI reference code's scoring of the same attack pass (its first restart): per batch of
  `reference_batch` consecutive examples (64, the reference's batch), the iterate with the highest batch-mean
  loss, and the prediction on it (roli.attacks.pgd.reference_pick). Always >= pgd: an example robust by
  roli's definition is correct on every iterate. Batches are chunked from their start, so it equals the
  reference's chunking of the whole set when the evaluation's batch size is a multiple of reference_batch.
  Scoring every iterate turns PGD's early stop off.
- autoattack: robust to AutoAttack (its own clean forward first; a state file per batch resumes it).
- the eps sweep: robust counts per budget (eps_sweep, steps of eps / 4).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from roli import _dist as D
from roli._env import progress_seconds
from roli.attacks.autoattack import cross_check, run_autoattack
from roli.attacks.pgd import PGD
from roli.attacks.sweep import clean_correct, eps_sweep
from roli.seeds import derive_seed


def batch_seed(seed: int, index: int) -> int:
    """The attack seed of batch `index` of an evaluation: its random starts depend on the batch, never on the
    process that attacks it, so a sharded evaluation equals one process's example by example."""
    return derive_seed(seed, "evaluation", index=index)


class AutoAttackStateError(ValueError):
    """AutoAttack refused a batch's state file (of another model or evaluation, or damaged)."""


class TensorBatches:
    """Images and labels held as tensors, in batches of `batch_size`; under torchrun each rank takes every
    world-th batch (D.shard). Iterates this rank's (x, y) batches; `ids` are their indices in the whole set,
    `parts` every batch's slice, `total` the number of batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y = x, y
        self.parts = [slice(i, i + batch_size) for i in range(0, len(y), batch_size)]
        self.total = len(self.parts)
        self.ids = list(D.shard(self.total))

    def __iter__(self):
        return ((self.x[self.parts[i]], self.y[self.parts[i]]) for i in self.ids)

    def __len__(self):
        return len(self.ids)


@dataclass
class Outcomes:
    """This rank's outcomes, batch by batch (`ids`: the batches' indices in the whole set). `clean`, `pgd`
    and `autoattack` hold one bool tensor per batch (None where the attack was not asked for)."""

    ids: list[int] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)
    pgd: list[torch.Tensor] | None = None
    pgd_reference: list[torch.Tensor] | None = None
    autoattack: list[torch.Tensor] | None = None
    aa_clean: int = 0  # AutoAttack's own clean count (cross-checked against `clean`)
    aa_per_attack: dict[str, int] = field(default_factory=dict)  # robust count after each of its attacks
    sweep: list[int] = field(default_factory=list)  # robust count per budget

    def totals(self, reduce: bool = True) -> dict:
        """Counts summed over ranks: n, clean, pgd, autoattack (None where not run), aa_clean, aa_per_attack
        (in AutoAttack's order) and sweep. A collective: every rank calls it (reduce=False: this rank's)."""
        names = list(self.aa_per_attack)
        if reduce:  # AutoAttack's order, from any rank that ran it
            names = next((k for k in D.gather_objects(names) if k), [])

        def count(flags):
            return sum(int(f.sum()) for f in flags)

        local = [
            sum(len(f) for f in self.clean),
            count(self.clean),
            count(self.pgd or []),
            count(self.pgd_reference or []),
            count(self.autoattack or []),
            self.aa_clean,
            *(self.aa_per_attack.get(k, 0) for k in names),
            *self.sweep,
        ]
        n, clean, pgd, pgd_ref, aa, aa_clean, *rest = (int(v) for v in (D.sum_(*local) if reduce else local))
        per_attack = dict(zip(names, rest[: len(names)], strict=True))
        return {
            "n": n,
            "clean": clean,
            "pgd": None if self.pgd is None else pgd,
            "pgd_reference": None if self.pgd_reference is None else pgd_ref,
            "autoattack": None if self.autoattack is None else aa,
            "aa_clean": aa_clean,
            "aa_per_attack": per_attack,
            "sweep": rest[len(names) :],
        }

    def per_example(self, parts: list[slice], n: int, device) -> dict[str, torch.Tensor]:
        """Every example's outcome (bool, n long, on `device`) per attack run, gathered over ranks: `parts[i]`
        is batch i's slice of the whole set. A collective: every rank calls it."""
        out = {}
        for name in ("clean", "pgd", "pgd_reference", "autoattack"):
            flags = getattr(self, name)
            if flags is None:
                continue
            whole = torch.zeros(n, dtype=torch.int64, device=device)
            for i, f in zip(self.ids, flags, strict=True):
                whole[parts[i]] = f.to(torch.int64)
            out[name] = D.sum_flags(whole).bool()
        return out


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation runs. pgd: PGD-`steps` with `restarts` (keep the best iterate; early stop where
    reference_batch is None, else the reference's scoring too, see the module docstring).
    sweep: the budgets of an eps sweep (empty: none), attacked in chunks of `sweep_chunk` replicated images
    (None: one batch's size). autoattack: its version ("standard", "plus", "rand") or None."""

    eps: float
    step_size: float
    steps: int = 10
    pgd: bool = True
    norm: str = "linf"
    restarts: int = 1
    loss: str = "ce"
    precision: str = "fp32"
    impl: str | None = None
    seed: int = 0
    sweep: tuple[float, ...] = ()
    autoattack: str | None = None
    sweep_chunk: int | None = None
    reference_batch: int | None = 64  # None: no reference scoring (PGD then stops early on broken examples)

    def run(
        self,
        model,
        batches: Iterable,
        *,
        state_dir: Path | None = None,
        report: Callable[[str], None] | None = None,
        aa_progress: Callable[[int], Callable | None] | None = None,
        after_batch: Callable[[], None] | None = None,
    ) -> Outcomes:
        """Evaluate `model` on `batches`: an iterable of this rank's (x, y) batches, with `ids`, their indices
        in the whole set (default: their positions), and `total`, the number of batches in the set (needed
        with after_batch under torchrun; TensorBatches and roli.specs.EvalBatches have both).

        state_dir: AutoAttack's state file per batch (batch{i}.pt). report: a progress line at most every
        ROLI_PROGRESS_SECONDS. aa_progress(i): AutoAttack's progress callable for batch i. after_batch: called
        after every batch and, under torchrun, as often on every rank (a rank with fewer batches calls it
        with none): it may run collectives, e.g. a stop check that raises."""
        ids = getattr(batches, "ids", None)
        count = len(ids) if ids is not None else len(batches) if hasattr(batches, "__len__") else None
        attack = None
        if self.pgd:
            attack = PGD(
                model,
                eps=self.eps,
                step_size=self.step_size,
                steps=self.steps,
                norm=self.norm,
                restarts=self.restarts,
                loss=self.loss,
                keep="best",
                early_stop=self.reference_batch is None,
                reference_chunk=self.reference_batch,
                precision=self.precision,
                impl=self.impl,
                seed=self.seed,
            )
        out = Outcomes(
            pgd=[] if self.pgd else None,
            pgd_reference=[] if self.pgd and self.reference_batch else None,
            autoattack=[] if self.autoattack else None,
            sweep=[0] * len(self.sweep),
        )
        progress = _Progress(report, count)
        k = -1
        for k, (x, y) in enumerate(batches):
            self._batch(model, attack, ids[k] if ids is not None else k, x, y, out, state_dir, aa_progress)
            progress.done(len(y))
            if after_batch is not None:
                after_batch()
        if after_batch is not None:  # as many calls on every rank: the ranks with fewer batches catch up
            total = getattr(batches, "total", k + 1)
            for _ in range(k + 1, -(-total // D.world())):
                after_batch()
        return out

    def _batch(self, model, attack, i: int, x, y, out: Outcomes, state_dir, aa_progress) -> None:
        out.ids.append(i)
        if attack is not None:
            attack.reseed(batch_seed(self.seed, i))
            res = attack.perturb(x, y)  # keep="best": the clean image is its first iterate
            out.clean.append(~res.clean_success)
            out.pgd.append(~res.clean_success & ~res.success)
            if out.pgd_reference is not None:
                ref = res.reference_success
                out.pgd_reference.append(~ref if ref is not None else torch.zeros_like(res.success))
        else:
            out.clean.append(clean_correct(model, x, y, self.precision))
        if self.sweep:
            accs = eps_sweep(
                model,
                (x, y),
                list(self.sweep),
                steps=self.steps,
                norm=self.norm,
                restarts=self.restarts,
                loss=self.loss,
                precision=self.precision,
                impl=self.impl,
                seed=batch_seed(self.seed, i),
                chunk_size=self.sweep_chunk or len(y),
            )
            out.sweep = [c + round(accs[e] * len(y)) for c, e in zip(out.sweep, self.sweep, strict=True)]
        if self.autoattack:
            out.autoattack.append(self._autoattack(model, i, x, y, out, state_dir, aa_progress))

    def _autoattack(self, model, i: int, x, y, out: Outcomes, state_dir, aa_progress) -> torch.Tensor:
        state = None if state_dir is None else Path(state_dir) / f"batch{i}.pt"
        try:  # the batch in one piece, with the evaluation's seed
            aa = run_autoattack(
                model,
                (x, y),
                self.eps,
                norm=self.norm,
                version=self.autoattack,
                state_path=state,
                batch_size=max(1, len(y)),
                seed=self.seed,
                precision=self.precision,
                progress=aa_progress(i) if aa_progress is not None else None,
            )
        except ValueError as e:
            raise AutoAttackStateError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        out.aa_clean += round(aa.clean_accuracy * len(y))
        for name, acc in aa.per_attack.items():
            out.aa_per_attack[name] = out.aa_per_attack.get(name, 0) + round(acc * len(y))
        return aa.robust

    @staticmethod
    def warnings(totals: dict) -> list[str]:
        """AutoAttack's cross-checks on the reduced totals (see roli.attacks.autoattack.cross_check)."""
        n = max(1, totals["n"])
        pgd = totals["pgd"] / n if totals["pgd"] is not None else None
        per = {k: v / n for k, v in totals["aa_per_attack"].items()}
        return cross_check(totals["n"], totals["clean"] / n, totals["aa_clean"] / n, totals["autoattack"] / n, per, pgd)


class _Progress:
    """At most one line every ROLI_PROGRESS_SECONDS (rank 0), off a terminal: batches done, rate, ETA."""

    def __init__(self, report: Callable[[str], None] | None, batches: int | None):
        self.report, self.batches, self.every = report if D.is_main() else None, batches, progress_seconds()
        self.k = self.images = 0
        self.t0 = self.last = time.time()

    def done(self, images: int) -> None:
        self.k, self.images = self.k + 1, self.images + images
        now = time.time()
        if self.report is None or now - self.last < self.every or self.k >= (self.batches or 0):
            return
        self.last = now
        rank = " (this rank)" if D.world() > 1 else ""
        self.report(
            f"batch {self.k}/{self.batches}{rank}, {self.images / max(now - self.t0, 1e-9):.1f} img/s, "
            f"ETA {(now - self.t0) / self.k * (self.batches - self.k):.0f} s"
        )
