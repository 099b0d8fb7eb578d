"""Each method's stages on top of the loop (Stages: ALP, finetuning, the clean probe, the test evaluation), the
forward check of a built model, a head to start from (--init), and the curves."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import torch

from roli import _dist as D
from roli._amp import grad_scaler
from roli._cli import BadValue
from roli._io import atomic_write, first_line, save_json
from roli.attacks.evaluation import AutoAttackStateError, Evaluation
from roli.config import StageSettings, TrainConfig
from roli.features import FeatureCache, fast_layout, train_linear_probes
from roli.models import apply_peft, load_checkpoint, save_checkpoint
from roli.models.fp8 import FP8Linears
from roli.seeds import derive_seed
from roli.training.guard import Guard, first_images
from roli.training.loop import (
    Interrupted,
    Stage,
    StopOnSignal,
    alp_stage_step,
    fit,
    ft_stage_step,
    make_optimizer,
    param_groups,
)

log = logging.getLogger("roli.train")


def check_forward(model, shape: tuple[int, ...], name: str) -> None:
    """One forward of one random image of the data's size through the built model (before anything is written):
    a model that cannot take these images fails here in one line, not after the run directory exists."""
    device = next(model.parameters()).device
    x = torch.rand((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure of the forward is the model not fitting the data
        embed = getattr(getattr(model, "backbone", None), "patch_embed", None)
        expects = getattr(embed, "img_size", None)
        size = tuple(getattr(getattr(model, "pre", None), "input_size", None) or shape[-2:])
        if expects is not None and tuple(expects) != size:
            raise BadValue(
                f"model: {name} takes {expects[0]}x{expects[1]} images and gets {size[0]}x{size[1]}; "
                f"build it for that size with --model-arg img_size={size[0]}, or resize inside the model "
                f"with --input-size {expects[0]}"
            ) from None
        raise BadValue(
            f"model: {name} fails on one {'x'.join(map(str, shape))} image of the dataset: {first_line(e)[:200]}"
        ) from None
    finally:
        model.train(was)
    if out.ndim != 2 or out.shape[0] != 1:
        raise BadValue(f"model: {name} returns shape {tuple(out.shape)} for one image; expected (1, classes)")


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "done.json").is_file()


def _finished(model, stage_dir: Path) -> dict | None:
    """A resumed run skips finished stages: their best model is loaded and their result returned."""
    if not _done(stage_dir):
        return None
    load_checkpoint(model, stage_dir / "best.pt")
    return json.loads((stage_dir / "done.json").read_text())


class Stages:
    """The stages of a run on its data: ALP, (PEFT) finetuning or pretraining, the clean linear probe, and the
    test evaluation. Built once from the run's TrainConfig; each stage trains into its own folder, leaves its
    best model in the model it was given, and returns its best epoch's record (a finished stage is skipped,
    its best model loaded)."""

    def __init__(self, cfg: TrainConfig, splits):
        self.cfg, self.splits = cfg, splits
        self.attacks, self.batches = cfg.attack_spec, cfg.batches
        self.trackers = None  # --log: roli.training.tracking.Trackers (main process), set by the run

    def optimizer(self, model, settings: StageSettings):
        """The stage's optimiser over `model`'s trainable parameters, in decay / no-decay groups."""
        groups = param_groups(model, settings.weight_decay, settings.optimizer)
        return make_optimizer(groups, settings.optimizer, settings.lr, self.cfg.momentum)

    def alp(self, model, stage_dir: Path, resume: bool) -> dict:
        """Adversarial linear probing: the head only, backbone frozen. Under torchrun the head's gradients are
        averaged by the step (no DDP forward)."""
        if (done := _finished(model, stage_dir)) is not None:
            return done
        apply_peft(model, "linear")
        fast_layout(model, self.attacks.precision)
        if self.attacks.channels_last:
            model.to(memory_format=torch.channels_last)
        return self._train("alp", model, model, alp_stage_step, self.cfg.settings("alp"), stage_dir, resume)

    def full(self, kind: str, model, stage_dir: Path, resume: bool) -> dict:
        """Pretraining or (PEFT) finetuning: every trainable parameter of `model`, with the settings of `kind`
        (pretrain | ft | ranli). The update runs through DDP under torchrun and through the compiled module
        with --compile; checkpoints keep `model`'s keys."""
        if (done := _finished(model, stage_dir)) is not None:
            return done
        if self.attacks.channels_last:
            model.to(memory_format=torch.channels_last)
        net = torch.compile(model) if self.cfg.compile else model
        if D.active():
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(net)
        name = "pretrain" if kind == "pretrain" else "ft"
        return self._train(name, model, net, ft_stage_step, self.cfg.settings(kind), stage_dir, resume)

    def _train(self, name: str, model, net, stage_step, settings: StageSettings, stage_dir: Path, resume: bool) -> dict:
        """One stage of `stage_step` updates of `net` (the model, or its DDP/compiled wrapper). The training
        attack is built per attack kind: the stage's own, and PGD-k after the catastrophic-overfitting guard
        (single-step attacks) fires. Attacks unwrap DDP: no all-reduce inside them."""
        opt = self.optimizer(model, settings)
        precision = self.attacks.precision
        if D.is_main():
            log.info("%s: %s epochs (warmup %s), learning rate %g from %s", name, settings.epochs, settings.warmup,
                     settings.lr, settings.lr_from or "the stage's settings")  # fmt: skip

        scaler = grad_scaler(precision, self.cfg.device)

        def make_step(kind: str, purpose: str = "training attack"):
            attack = self.attacks.training(kind, net, purpose)
            return stage_step(net, attack, opt, precision, scaler, self.cfg.accumulate), attack

        train, val, _, _ = self.splits
        step, attack = make_step(settings.attack)
        a = self.attacks
        if a.training_precision == "fp8" and attack is not None and D.is_main():
            log.info("%s: training attack in fp8: %s", name, FP8Linears(model).describe())
        stage = Stage(
            name=name,
            model=model,
            step=step,
            train=self.batches.train(train),
            val=self.batches.eval(val),
            optimizer=opt,
            epochs=settings.epochs,
            warmup=settings.warmup,
            attack=attack,
            eps=a.eps,
            step_size=a.step_size,
            val_steps=a.val_steps,
            precision=precision,
            seed=a.seed,
            norm=a.norm,
            attack_label=a.label(settings.attack),
            select_by=self.cfg.select_by,
            scaler=scaler,
        )
        if self.cfg.guard_spec.watches(settings.attack):
            stage.guard = self._guard(stage, settings.attack, model, make_step)
        if self.trackers is not None:
            stage.on_epoch = lambda row: self.trackers.epoch(row, stage.history, stage_dir)
        best = fit(stage, stage_dir, resume=resume)
        if D.is_main():
            plot_curves(stage.history, stage_dir / "curves.png", name)
            save_json(best, stage_dir / "done.json")
        D.barrier()
        return best

    def _guard(self, stage: Stage, kind: str, model, make_step) -> Guard:
        """The catastrophic-overfitting guard of a single-step stage; its copy of the training attack has its
        own seed (roli.seeds): its checks never draw from the training's."""
        g, a = self.cfg.guard_spec, self.attacks
        x, y = first_images(stage.val, max(1, g.images // D.world()))
        return Guard(
            every=g.every,
            drop=g.drop,
            x=x,
            y=y,
            eps=a.eps,
            precision=a.precision,
            seed=derive_seed(a.seed, "guard check"),
            single=lambda: a.single_step(kind, model),
            fallback=lambda: make_step("pgd", "fallback attack"),
            label=stage.attack_label,
            fallback_label=a.label("pgd"),
        )

    def linear_probe(self, model, stage_dir: Path) -> dict:
        """Clean LP through the feature cache: a sweep over learning rates around the stage's, best by val
        accuracy."""
        train, val, _, _ = self.splits
        if (done := _finished(model, stage_dir)) is not None:
            return done
        apply_peft(model, "linear")
        cache, device = FeatureCache(), self.batches.device
        tr, va = cache.get(model, train, "train", device=device), cache.get(model, val, "val", device=device)
        settings = self.cfg.settings("lp")
        lrs = [settings.lr * f for f in (0.1, 0.3, 1.0, 3.0)]
        wds = [settings.weight_decay] * len(lrs)
        res = train_linear_probes(
            (tr.x, tr.y),
            (va.x, va.y),
            model.num_classes,
            lrs,
            wds,
            epochs=settings.epochs,
            warmup=settings.warmup,
            batch_size=self.batches.batch_size,
            optimizer=settings.optimizer,
            momentum=self.cfg.momentum,
            seed=self.attacks.seed,
        )
        with torch.no_grad():
            model.head.weight.copy_(res.weight)
            model.head.bias.copy_(res.bias)
        best = {"epoch": res.epoch, "val_clean": res.val_acc, "lr": res.lr}
        if D.is_main():  # every rank trained the same heads from the same features
            stage_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(model, stage_dir / "best.pt", meta={"stage": "lp", **best})
            save_json(best, stage_dir / "done.json")
        D.barrier()
        return best

    def test(self, model, state_dir: Path | None = None) -> dict:
        """Clean and PGD-`val_steps` accuracy on the test set (and AutoAttack with --autoattack), streamed in
        batches of 256 and sharded over torchrun ranks by batch; the counts are reduced. Each batch is attacked
        with its own seed (batch_seed), as `python -m roli.evaluate --run` does, so both report the same
        figures whatever the number of processes.

        AutoAttack keeps a state file per batch in `state_dir` (bound to the model and the data): SIGINT or
        SIGTERM stops it after the current batch, and --resume continues from the batches already done."""
        a, version, test = self.attacks, self.cfg.autoattack, self.splits[2]
        if self.cfg.n_ex is not None and self.cfg.n_ex < len(test):  # --n-ex: the first N (recorded as partial)
            test = test.subset(torch.arange(self.cfg.n_ex))
        batches = self.batches.eval(test)
        with StopOnSignal() as stop:

            def stop_check() -> None:  # a collective: every rank calls it as often (Evaluation.run)
                if D.any_(stop.signum is not None):
                    raise Interrupted(stop.signum or signal.SIGTERM, state_dir or Path("."))

            try:
                outcomes = a.evaluation(version).run(
                    model,
                    batches,
                    state_dir=state_dir,
                    aa_progress=lambda i: log.info if D.is_main() else None,
                    after_batch=stop_check if version else None,
                )
            except AutoAttackStateError as e:  # a damaged state file, or one of another model
                raise BadValue(f"autoattack: {e}") from None
        t = outcomes.totals()
        n = max(t["n"], 1)
        out = {"n": t["n"], "of": len(self.splits[2]), "clean": t["clean"] / n, f"pgd{a.val_steps}": t["pgd"] / n,
               f"pgd{a.val_steps}_reference": t["pgd_reference"] / n}  # fmt: skip
        if version:
            out["autoattack"] = t["autoattack"] / n
            out["autoattack_per_attack"] = {k: v / n for k, v in t["aa_per_attack"].items()}
            if D.is_main():
                out["autoattack_warnings"] = Evaluation.warnings(t)
        return out


def load_init(model, path: str) -> None:
    """--init PATH: a roli checkpoint holding a head for this class count (from lp, alp or ft)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BadValue(f"init: cannot read {path}: {first_line(e)[:150]}") from None
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict) or "head.weight" not in sd:
        raise BadValue(f"init: {path} is not a head checkpoint (a roli checkpoint from --method lp/alp/ft)")
    bad = sorted(
        k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    )
    if bad:
        raise BadValue(
            f"init: {path} holds non-finite values ({', '.join(bad[:3])}); a head to start from must be finite"
        )
    if sd["head.weight"].shape != model.head.weight.shape:
        raise BadValue(
            f"init: {path} has a head for {sd['head.weight'].shape[0]} classes; this run has {model.num_classes}"
        )
    try:
        load_checkpoint(model, path)
    except ValueError as e:
        raise BadValue(f"init: {e}") from None


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Clean and robust validation accuracy per epoch as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot at %s (pip install matplotlib)", path)
        return
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(epochs, [h["val_clean"] for h in history], marker="o", label="val clean")
    ax.plot(epochs, [h["val_robust"] for h in history], marker="s", label="val robust (PGD)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
