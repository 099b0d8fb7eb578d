"""The RoLI pipeline on top of the loop: data, model, each method's stages, test evaluation, outputs."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import torch

from roli import _dist as D
from roli._io import first_line, save_json
from roli.attacks import PGD, robust_counts, run_autoattack
from roli.attacks.autoattack import cross_check
from roli.attacks.fast import label as attack_label
from roli.attacks.fast import training_attack
from roli.data import ArrayData, load_dataset
from roli.features import FeatureCache, fast_layout, train_linear_probes
from roli.models import (
    apply_peft,
    create_classifier,
    init_head,
    load_checkpoint,
    load_pretrained,
    resolve_checkpoint,
    save_checkpoint,
)
from roli.training.config import ConfigError, StageSettings, TrainConfig, parse_classes
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


def load_splits(cfg: TrainConfig):
    """(train, val, test, num_classes), restricted to cfg.classes (relabelled 0..k-1) when given."""
    try:
        s = load_dataset(
            cfg.dataset,
            val_percent=cfg.val_percent,
            split_seed=cfg.split_seed,
            image_root=cfg.image_root,
            resize=cfg.resize,
            crop_size=cfg.crop_size,
            interpolation=cfg.data_interpolation,
        )
    except ValueError as e:
        raise ConfigError(f"dataset: {e}") from None
    if s.train is None or s.test is None:
        raise ConfigError(f"dataset: {cfg.dataset} needs train and test splits for training")
    if isinstance(s.train, ArrayData):
        for name, d in (("val", s.val), ("test", s.test)):
            if d is not None and tuple(d.x.shape[1:]) != tuple(s.train.x.shape[1:]):
                raise ConfigError(f"dataset: {cfg.dataset}: the {name} images are {tuple(d.x.shape[1:])} (CHW), the "
                                  f"train images {tuple(s.train.x.shape[1:])}; every split needs one size")  # fmt: skip
    classes = parse_classes(cfg.classes)
    distinct = torch.unique(
        s.train.y if isinstance(s.train, ArrayData) else torch.tensor([y for _, y in s.train.items])
    )
    if classes is None and len(distinct) < 2:
        raise ConfigError(f"dataset: {cfg.dataset}: every training label is {distinct.tolist()}; a classifier needs "
                          "at least two classes")  # fmt: skip
    if classes is None:
        if s.num_classes < 2:
            raise ConfigError(f"dataset: {cfg.dataset} has {s.num_classes} class; a classifier needs at least two")
        s.val.origin = s.val_split  # how validation was split off (recorded in config.json)
        return s.train, s.val, s.test, s.num_classes
    if max(classes) >= s.num_classes:
        raise ConfigError(f"classes: {cfg.classes} names a class >= {s.num_classes} (the dataset's count)")
    table = torch.full((s.num_classes,), -1, dtype=torch.long)
    table[torch.tensor(classes)] = torch.arange(len(classes))

    def keep(d):
        idx = torch.nonzero(table[d.y] >= 0)[:, 0]
        sub = d.subset(idx)
        if isinstance(sub, ArrayData):
            sub.y, sub.num_classes = table[sub.y], len(classes)
        else:
            names = [sub.classes[c] for c in classes] if sub.classes is not None else None
            sub = type(sub)([(p, int(table[y])) for p, y in sub.items], len(classes), sub.name, names, sub.transform)
        return sub

    val = keep(s.val)
    val.origin = s.val_split
    return keep(s.train), val, keep(s.test), len(classes)


def checkpoint_of(cfg: TrainConfig) -> str | None:
    """The backbone weights of the run: --checkpoint, or a registry backbone's file in the cache."""
    try:
        return resolve_checkpoint(cfg.model, cfg.checkpoint, cfg.download)
    except ValueError as e:
        raise ConfigError(f"checkpoint: {e}") from None


def check_backbone(cfg: TrainConfig, checkpoint: str | None) -> None:
    """Transfer learning from a random backbone is refused unless --random-backbone says it is meant."""
    if cfg.ema and checkpoint is None:
        raise ConfigError("ema: loads a checkpoint's EMA weights; give --checkpoint FILE (a timm CheckpointSaver file)")
    if cfg.method == "pretrain":  # trains the backbone itself: from scratch or from the weights given
        return
    if checkpoint is None and not cfg.pretrained and not cfg.random_backbone:
        raise ConfigError(f"model: --method {cfg.method} would transfer from a random backbone ({cfg.model} has no "
                          "weights): give --checkpoint FILE (a robust backbone; roli zoo lists published ones), "
                          "--pretrained (timm's own weights) or --random-backbone if that is meant")  # fmt: skip
    if cfg.random_backbone and (checkpoint or cfg.pretrained):
        raise ConfigError("random-backbone: cannot go with --checkpoint or --pretrained (they give the weights)")
    if cfg.pretrained and ":" in cfg.model:
        raise ConfigError(f"pretrained: timm's own weights exist for timm names only, not {cfg.model}; give "
                          "--checkpoint FILE")  # fmt: skip


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
            raise ConfigError(f"model: {name} takes {expects[0]}x{expects[1]} images and gets {size[0]}x{size[1]}; "
                              f"build it for that size with --model-arg img_size={size[0]}, or resize inside the model "
                              f"with --input-size {expects[0]}") from None  # fmt: skip
        raise ConfigError(f"model: {name} fails on one {'x'.join(map(str, shape))} image of the dataset: "
                          f"{first_line(e)[:200]}") from None  # fmt: skip
    finally:
        model.train(was)
    if out.ndim != 2 or out.shape[0] != 1:
        raise ConfigError(f"model: {name} returns shape {tuple(out.shape)} for one image; expected (1, classes)")


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, checkpoint: str | None = None,
                quiet: bool = False):  # fmt: skip
    """The classifier with the backbone's weights and a fresh random head (the checkpoint's classifier only
    with --keep-source-head); the log says which head it starts from."""
    pre = {"mean": cfg.mean if cfg.mean is not None else "auto", "std": cfg.std if cfg.std is not None else "auto",
           "input_size": cfg.input_size or "auto", "interpolation": cfg.interpolation}  # fmt: skip
    try:
        extra = {"pretrained": True} if cfg.pretrained else {}
        model = create_classifier(cfg.model, num_classes, in_chans=in_chans, **pre, **extra, **cfg.model_args)
    except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: e.g. a negative width in --model-arg
        raise ConfigError(f"model: {first_line(e)}") from None
    head = None  # the checkpoint's classifier, where --keep-source-head loaded it
    if checkpoint:
        try:
            report = load_pretrained(model, checkpoint, strict=not cfg.non_strict, keep_head=cfg.keep_source_head,
                                     ema=cfg.ema)  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"checkpoint: {e}") from None
        bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ConfigError(f"checkpoint: {checkpoint} holds non-finite values (NaN/inf) in {len(bad)} tensor(s), "
                              f"e.g. {bad[0]}; use another file")  # fmt: skip
        if not quiet:
            log.info("checkpoint: %s", report)
        if report.head_loaded:
            head = "the checkpoint's classifier (--keep-source-head)"
        elif cfg.keep_source_head:
            raise ConfigError(f"keep-source-head: the checkpoint has no classifier for {num_classes} classes "
                              f"({report.head})")  # fmt: skip
    elif cfg.keep_source_head:
        raise ConfigError("keep-source-head: needs a --checkpoint whose classifier to keep")
    if head is None:
        if cfg.head_init != "torch":  # create_classifier's head is already nn.Linear's own init
            init_head(model.head, cfg.head_init)
        head = f"a fresh random head (head init: {cfg.head_init})"
    if not quiet:
        log.info("model: %s, starting from %s", model.name, head)
    return model.to(cfg.device)


def workers(cfg: TrainConfig) -> int:
    """Data-loading processes of file datasets: --workers, else up to 8 from the CPUs (per rank)."""
    if cfg.workers is not None:
        return cfg.workers
    return max(1, min(8, (os.cpu_count() or 2) // max(1, D.world()) - 1))


def _loader(cfg: TrainConfig, data, shuffle: bool):
    """Per-rank batches under torchrun (the global batch stays cfg.batch_size); the whole set otherwise."""
    if D.active() and shuffle:
        per_rank = cfg.batch_size // D.world()
        if isinstance(data, ArrayData):
            return data.loader(per_rank, shuffle=True, device=cfg.device, seed=cfg.seed, rank=D.rank(), world=D.world())
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(data, num_replicas=D.world(), rank=D.rank(), shuffle=True, seed=cfg.seed)
        return data.loader(per_rank, device=cfg.device, seed=cfg.seed, sampler=sampler, workers=workers(cfg))
    if isinstance(data, ArrayData):
        return data.loader(cfg.batch_size, shuffle=shuffle, device=cfg.device, seed=cfg.seed)
    return data.loader(cfg.batch_size, shuffle=shuffle, device=cfg.device, seed=cfg.seed, workers=workers(cfg))


class EvalBatches:
    """Batches of a validation or test set streamed to the device (never held there whole), and `ids`, their
    indices among the set's batches. Under torchrun each rank takes every world-th batch (D.shard): the
    batches, and the per-batch attack seeds, are those of one process, so reduced results equal its own."""

    def __init__(self, loader, ids: list[int]):
        self.loader, self.ids = loader, ids

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.ids)


def eval_batches(cfg: TrainConfig, data, batch_size: int = 256) -> EvalBatches:
    size = batch_size if isinstance(data, ArrayData) else min(batch_size, 4 * cfg.batch_size)
    n = len(data)
    ids = list(D.shard(-(-n // size)))
    if D.active():
        parts = [torch.arange(i * size, min(n, (i + 1) * size)) for i in ids]
        data = data.subset(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
    if isinstance(data, ArrayData):
        return EvalBatches(data.loader(size, device=cfg.device), ids)
    return EvalBatches(data.loader(size, device=cfg.device, workers=workers(cfg)), ids)


def _val(cfg: TrainConfig, data):
    return eval_batches(cfg, data)


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "done.json").is_file()


def _finished(model, stage_dir: Path) -> dict | None:
    """A resumed run skips finished stages: their best model is loaded and their result returned."""
    if not _done(stage_dir):
        return None
    load_checkpoint(model, stage_dir / "best.pt")
    return json.loads((stage_dir / "done.json").read_text())


def _attack(cfg: TrainConfig, net, kind: str, seed_offset: int = 0) -> PGD | None:
    """The training attack `kind` (pgd | fgsm-rs | n-fgsm | none) on `net`; None trains on clean images."""
    if kind == "none" or (kind == "pgd" and cfg.steps == 0):
        return None
    # Each torchrun rank draws its own random starts (its own shard of the batch needs its own noise).
    attack = training_attack(kind, net, cfg.eps, cfg.step_size, cfg.steps, cfg.norm, random_start=cfg.random_start,
                             precision=cfg.precision, seed=cfg.seed + seed_offset + 1_000_003 * D.rank(),
                             memory_format="channels_last" if cfg.channels_last else "auto", fold_bn=cfg.fold_bn,
                             cuda_graph=cfg.cuda_graph)  # fmt: skip
    attack.deferred = True  # its value checks are read at the loop's synchronisation points
    return attack


def _label(cfg: TrainConfig, kind: str) -> str:
    return "clean" if kind == "none" or (kind == "pgd" and cfg.steps == 0) else attack_label(kind, cfg.steps)


def _fit(cfg: TrainConfig, name: str, model, opt, make_step, settings: StageSettings, splits, stage_dir: Path,
         resume: bool) -> dict:  # fmt: skip
    """Train one stage. make_step(kind) -> (step function, attack) for a training attack kind: the stage's
    own, and PGD-k after the catastrophic-overfitting guard (single-step attacks) fires."""
    train, val, _, _ = splits
    step, attack = make_step(settings.attack)
    stage = Stage(name=name, model=model, step=step, train=_loader(cfg, train, True), val=_val(cfg, val),
                  optimizer=opt, epochs=settings.epochs, warmup=settings.warmup, attack=attack, eps=cfg.eps,
                  step_size=cfg.step_size, val_steps=cfg.val_steps, precision=cfg.precision, seed=cfg.seed,
                  norm=cfg.norm, attack_label=_label(cfg, settings.attack))  # fmt: skip
    if settings.attack in ("fgsm-rs", "n-fgsm") and cfg.guard_every > 0:
        x, y = first_images(stage.val, max(1, cfg.guard_images // D.world()))

        # The guard's copy of the training attack has its own seed: checks never draw from the training's.
        def single():
            return training_attack(settings.attack, model, cfg.eps, precision=cfg.precision, seed=cfg.seed + 7,
                                   fold_bn=cfg.fold_bn)  # fmt: skip

        stage.guard = Guard(every=cfg.guard_every, drop=cfg.guard_drop, x=x, y=y, eps=cfg.eps,
                            precision=cfg.precision, seed=cfg.seed + 5, single=single,
                            fallback=lambda: make_step("pgd", 2_000_003), label=stage.attack_label,
                            fallback_label=_label(cfg, "pgd"))  # fmt: skip
    best = fit(stage, stage_dir, resume=resume)
    if D.is_main():
        plot_curves(stage.history, stage_dir / "curves.png", name)
        save_json(best, stage_dir / "done.json")
    D.barrier()
    return best


def _optimizer(cfg: TrainConfig, model, settings: StageSettings):
    groups = param_groups(model, settings.weight_decay, settings.optimizer)
    return make_optimizer(groups, settings.optimizer, settings.lr, cfg.momentum)


def train_alp(cfg: TrainConfig, model, splits, stage_dir: Path, resume: bool) -> dict:
    """Adversarial linear probing into stage_dir: the head only, backbone frozen; leaves the best model in
    `model`. Under torchrun the head's gradients are averaged by the step (no DDP forward)."""
    if (done := _finished(model, stage_dir)) is not None:
        return done
    apply_peft(model, "linear")
    fast_layout(model, cfg.precision)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    settings = cfg.settings("alp")
    opt = _optimizer(cfg, model, settings)

    def make_step(kind: str, seed_offset: int = 0):
        attack = _attack(cfg, model, kind, seed_offset)
        return alp_stage_step(model, attack, opt, cfg.precision), attack

    return _fit(cfg, "alp", model, opt, make_step, settings, splits, stage_dir, resume)


def train_full(cfg: TrainConfig, kind: str, model, splits, stage_dir: Path, resume: bool) -> dict:
    """Pretraining or (PEFT) finetuning into stage_dir: every trainable parameter of `model`, with the
    settings of `kind` (pretrain | ft | ranli); leaves the best model in `model`. The update runs through
    DDP under torchrun and through the compiled module with --compile; checkpoints keep `model`'s keys."""
    if (done := _finished(model, stage_dir)) is not None:
        return done
    settings = cfg.settings(kind)
    opt = _optimizer(cfg, model, settings)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model
    if D.active():
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net)

    def make_step(attack_kind: str, seed_offset: int = 0):
        attack = _attack(cfg, net, attack_kind, seed_offset)  # attacks unwrap DDP: no all-reduce inside them
        return ft_stage_step(net, attack, opt, cfg.precision), attack

    name = "pretrain" if kind == "pretrain" else "ft"
    return _fit(cfg, name, model, opt, make_step, settings, splits, stage_dir, resume)


def linear_probe(cfg: TrainConfig, model, splits, stage_dir: Path) -> dict:
    """Clean LP through the feature cache: a sweep over learning rates around cfg.lr, best by val accuracy."""
    train, val, _, _ = splits
    if (done := _finished(model, stage_dir)) is not None:
        return done
    apply_peft(model, "linear")
    cache = FeatureCache()
    tr, va = cache.get(model, train, "train", device=cfg.device), cache.get(model, val, "val", device=cfg.device)
    settings = cfg.settings("lp")
    lrs = [settings.lr * f for f in (0.1, 0.3, 1.0, 3.0)]
    wds = [settings.weight_decay] * len(lrs)
    res = train_linear_probes((tr.x, tr.y), (va.x, va.y), model.num_classes, lrs, wds, epochs=settings.epochs,
                              warmup=settings.warmup, batch_size=cfg.batch_size, optimizer=settings.optimizer,
                              momentum=cfg.momentum, seed=cfg.seed)  # fmt: skip
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


def load_init(cfg: TrainConfig, model, path: str) -> None:
    """--init PATH: a roli checkpoint holding a head for this class count (from lp, alp or ft)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"init: cannot read {path}: {first_line(e)[:150]}") from None
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict) or "head.weight" not in sd:
        raise ConfigError(f"init: {path} is not a head checkpoint (a roli checkpoint from --method lp/alp/ft)")
    if sd["head.weight"].shape != model.head.weight.shape:
        raise ConfigError(f"init: {path} has a head for {sd['head.weight'].shape[0]} classes; this run has "
                          f"{model.num_classes}")  # fmt: skip
    try:
        load_checkpoint(model, path)
    except ValueError as e:
        raise ConfigError(f"init: {e}") from None


def evaluate_test(cfg: TrainConfig, model, test, state_dir: Path | None = None) -> dict:
    """Clean and PGD-`val_steps` accuracy on the test set (and AutoAttack with --autoattack), streamed in
    batches of 256 and sharded over torchrun ranks by batch; the counts are reduced. Each batch is attacked
    with its own seed (batch_seed), as `python -m roli.evaluate --run` does, so both report the same figures
    whatever the number of processes.

    AutoAttack keeps a state file per batch in `state_dir` (bound to the model and the data): SIGINT or
    SIGTERM stops it after the current batch, and --resume continues from the batches already done."""
    batches = eval_batches(cfg, test)
    clean, robust, n = robust_counts(model, batches, cfg.eps, cfg.step_size, cfg.val_steps, cfg.precision, cfg.seed,
                                     cfg.norm, batch_ids=batches.ids)  # fmt: skip
    aa_robust, aa_clean, aa_per = 0, 0, {}
    if cfg.autoattack:
        with StopOnSignal() as stop:
            for i, (x, y) in zip(batches.ids, batches, strict=True):  # state per batch: any number of ranks resumes
                state = None if state_dir is None else state_dir / f"batch{i}.pt"
                try:
                    # The batch in one piece and the run's seed, as python -m roli.evaluate --run attacks it.
                    aa = run_autoattack(model, x, y, cfg.eps, norm=cfg.norm, version=cfg.autoattack,
                                        precision=cfg.precision, state_path=state, batch_size=max(1, len(y)),
                                        seed=cfg.seed, progress=log.info if D.is_main() else None)  # fmt: skip
                except ValueError as e:  # a damaged state file, or one of another model
                    raise ConfigError(f"autoattack: {first_line(e)}") from None
                aa_robust += int(aa.robust.sum())
                aa_clean += round(aa.clean_accuracy * len(y))
                for name, acc in aa.per_attack.items():
                    aa_per[name] = aa_per.get(name, 0) + round(acc * len(y))
                if D.any_(stop.signum is not None):
                    raise Interrupted(stop.signum or signal.SIGTERM, state_dir or Path("."))
    names = list(aa_per)
    clean, robust, n, aa_robust, aa_clean, *per = D.sum_(clean, robust, n, aa_robust, aa_clean,
                                                          *(aa_per[k] for k in names))  # fmt: skip
    out = {"n": int(n), "clean": clean / max(n, 1), f"pgd{cfg.val_steps}": robust / max(n, 1)}
    if cfg.autoattack:
        out["autoattack"] = aa_robust / max(n, 1)
        out["autoattack_per_attack"] = {k: v / max(n, 1) for k, v in zip(names, per, strict=True)}
        if D.is_main():
            pgd, per = out[f"pgd{cfg.val_steps}"], out["autoattack_per_attack"]
            out["autoattack_warnings"] = cross_check(int(n), out["clean"], aa_clean / max(n, 1), out["autoattack"], per,
                                                     pgd)  # fmt: skip
    return out


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
    fig.savefig(path)
    plt.close(fig)
