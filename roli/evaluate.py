"""`python -m roli.evaluate`: clean, PGD, eps-sweep and AutoAttack accuracy of a model on a dataset.

    python -m roli.evaluate --model mypkg.nets:small_cnn --checkpoint net.pt --dataset digits \\
        --attack pgd --steps 10 --eps 0.1 --eps-sweep 0.02,0.05,0.1 --autoattack standard --out res.json
    python -m roli.evaluate --run runs/c10-lora [--stage roli-ft] --autoattack standard

--run evaluates a run that `python -m roli.train` produced, any PEFT method: the model is rebuilt from the
run's config.json (architecture, preprocessing, PEFT method) and the stage's best.pt is loaded strictly;
the data, budget, PGD steps and seed default to the run's (the test split), so PGD reproduces the run's
own test figures; every attack below can be added.

Across processes: `torchrun --nproc_per_node N -m roli.evaluate ...` (gloo on CPU, NCCL on GPU, each rank
on its own GPU) gives each rank every N-th batch; every batch is attacked with its own seeds, so the
per-example results, and the accuracies, equal one process's. The JSON records "processes": N and the
per-example outcomes. `--aa-state DIR` keeps one AutoAttack state file per batch: an interrupted evaluation,
with any number of processes, continues from the batches already done.

Budgets accept fractions ("8/255"). The worst case counts a sample as robust only if it is correct on
the clean image and under every attack that ran. Results print as a table and are written as JSON
(atomically: an interrupted run never leaves a half-written file in place of a good one).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from roli import _dist as D
from roli import _env
from roli._cli import BadValue, OneLineParser, auto_device, budget_text, parse_budget, parse_kwargs, prog
from roli._io import file_sha256, first_line, load_tagged, remove_stale_temporaries, save_json
from roli.attacks.autoattack import VERSIONS as AA_VERSIONS
from roli.attacks.evaluation import AutoAttackStateError, Evaluation, TensorBatches
from roli.config import TrainConfig, check_code_from_file
from roli.data import load_dataset
from roli.models import RobustClassifier
from roli.ops import requested_impl, unavailable_reason
from roli.rundir import (
    FINGERPRINT,
    MARKER,
    RunLock,
    check_as_written,
    check_fingerprint,
    check_written_here,
    fingerprint,
)
from roli.specs import DataSpec, ModelSpec, PeftSpec


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=prog("evaluate"), description=__doc__.strip())
    g = p.add_argument_group("model")
    g.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        metavar="RUN_DIR",
        help="evaluate a run of python -m roli.train (instead of --model); under torchrun write --run-dir, "
        "since torchrun reads --run as an abbreviation of its own --run-path",
    )
    g.add_argument(
        "--allow-changed-data",
        action="store_true",
        help="with --run: evaluate although the run's data or settings changed since it trained (what "
        "changed is recorded in the results)",
    )
    g.add_argument(
        "--trust-code",
        action="store_true",
        help="with --run: build a package.module:function model named in the run's config.json even when "
        "it is not an installed package's",
    )
    g.add_argument("--stage", help="with --run: which stage's best.pt (default: the last one the run finished)")
    g.add_argument(
        "--model",
        help="a published robust backbone (python -m roli.zoo), a timm name "
        "or 'package.module:function' (an nn.Module factory)",
    )
    g.add_argument(
        "--checkpoint",
        help="weights (.pt/.pth/.bin/.safetensors; timm, ARES, RobustBench, MadryLab, "
        "RoLI-reference or roli format) holding the classifier to evaluate",
    )
    g.add_argument("--non-strict", action="store_true", help="load a checkpoint with missing/unexpected keys")
    g.add_argument("--ema", action="store_true", help="load the checkpoint's EMA weights (timm CheckpointSaver files)")
    g.add_argument(
        "--download",
        action="store_true",
        help="registry backbones: fetch the file into the cache when no --checkpoint is given",
    )
    g.add_argument("--timm-pretrained", action="store_true", help="start from timm's weights (needs a reachable hub)")
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to the model constructor, e.g. img_size=32 (repeatable)",
    )
    g.add_argument("--num-classes", type=int, help="classes of the model (default: the dataset's)")
    g.add_argument("--mean", help="per-channel mean applied inside the model, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="per-channel std applied inside the model")
    g.add_argument("--input-size", type=int, help="resize images to this size inside the model")
    g.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic"], help="of that resize")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        help="digits, npz:PATH, cifar10:ROOT, cifar100:ROOT, imagefolder:ROOT or json:DIR "
        "(with --run: the run's by default)",
    )
    g.add_argument("--image-root", help="image root of a json:DIR dataset (default: DIR)")
    g.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to evaluate")
    g.add_argument("--n-ex", type=int, help="evaluate the first N examples only")
    g.add_argument("--batch-size", type=int, default=256, help="images per attack batch")
    g = p.add_argument_group("attacks")
    g.add_argument("--attack", default="pgd", choices=["pgd", "none"], help="the PGD attack, or none")
    g.add_argument("--norm", choices=["linf", "l2"], help="threat model (default linf, or the run's)")
    g.add_argument("--eps", help="budget, a number or a fraction like 8/255 (default 8/255, or the run's)")
    g.add_argument("--step-size", help="PGD step (default: eps/4, i.e. 2/255 for 8/255)")
    g.add_argument("--steps", type=int, help="PGD steps (default 10, or the run's validation steps)")
    g.add_argument("--restarts", type=int, default=1, help="PGD random restarts (per-sample worst case)")
    g.add_argument("--loss", default="ce", choices=["ce", "dlr"], help="PGD loss")
    g.add_argument("--eps-sweep", help="comma-separated budgets, all attacked in one batched run")
    g.add_argument("--autoattack", choices=[v for v in AA_VERSIONS if v != "custom"], help="also run AutoAttack")
    g.add_argument(
        "--aa-state",
        metavar="DIR",
        help="a directory for AutoAttack's state, one file per batch: an interrupted evaluation resumes from it",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="forward/backward precision (default fp32 / the run's)"
    )
    g.add_argument("--device", default="auto", help="auto (cuda where available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--impl", help="backend of the fused ops: auto, torch, cpp, cuda, triton")
    g.add_argument("--seed", type=int, help="seeds the random starts (default 0, or the run's)")
    g.add_argument(
        "--out",
        help="write the results as JSON here (with --run, default: a new file in "
        "RUN_DIR/STAGE/evaluations/, where roli report reads AutoAttack results from)",
    )
    p.add_defaults({a.dest: a.default for a in p._actions if a.dest != "help"})
    return p


def _model(args, num_classes: int, in_chans: int, device: torch.device) -> RobustClassifier:
    """--model/--checkpoint: the classifier as trained or published (ModelSpec.build_trained)."""
    try:
        spec = ModelSpec(args.model, parse_kwargs(args.model_arg), checkpoint=args.checkpoint,
                         non_strict=args.non_strict, ema=args.ema, download=args.download,
                         pretrained=args.timm_pretrained, mean=args.mean, std=args.std, input_size=args.input_size,
                         interpolation=args.interpolation)  # fmt: skip
        return spec.build_trained(num_classes, in_chans, device).eval()
    except BadValue as e:  # the spec names its field (model: ..., checkpoint: ...); this command's flags have --
        raise BadValue(f"--{e}") from None


def _fraction(flags: torch.Tensor) -> float:
    """The share of True, from exact counts (as the trainer reports it)."""
    return int(flags.sum()) / max(1, flags.numel())


def _bits(flags: torch.Tensor) -> str:
    """Per-example outcomes as a string of 0/1 (in the data's order)."""
    return "".join("1" if v else "0" for v in flags.tolist())


def _aa_progress(batch: int, batches: int):
    """AutoAttack's line after each attack, on stderr (rank 0): AutoAttack takes minutes per batch."""
    if not D.is_main():
        return None
    return lambda line: print(f"evaluate: batch {batch + 1}/{batches}: {line}", file=sys.stderr, flush=True)


_HELD: list = []  # the lock of the --run directory, held until main() returns

STAGE_ORDER = ("roli-ft", "ft", "ranli-ft", "alp", "lp", "pretrain")  # --run's default: the first present


def _from_run(args):
    """--run: the run's TrainConfig and stage directory; fills the flags left unset with the run's values."""
    run = Path(args.run).expanduser()
    if not (run / "config.json").is_file():
        inner = sorted(str(p.parent) for p in run.glob("*/config.json")) if run.is_dir() else []
        if inner:  # e.g. the demo's directory: one run per method
            listed = " | --run ".join(inner)
            raise BadValue(f"--run: {run} holds {len(inner)} runs, evaluate one of them: --run {listed}")
        raise BadValue(f"--run: {run} holds no config.json: not a run directory of {prog('train')}")
    given = [
        flag
        for flag, value in (
            ("--model", args.model),
            ("--checkpoint", args.checkpoint),
            ("--model-arg", args.model_arg),
            ("--mean", args.mean),
            ("--std", args.std),
            ("--input-size", args.input_size),
            ("--num-classes", args.num_classes),
            ("--ema", args.ema),
            ("--timm-pretrained", args.timm_pretrained),
        )
        if value
    ]
    if given:
        raise BadValue(f"--run rebuilds the model as the run trained it: drop {', '.join(given)}")
    stages = [s for s in STAGE_ORDER if (run / s / "best.pt").is_file()]
    reads = ("config.json", FINGERPRINT, *(f"{s}/best.pt" for s in ([args.stage] if args.stage else stages[:1])))
    check_as_written(run, "--run", "evaluate the files roli wrote (or train the run again)", only=reads)
    try:
        cfg = TrainConfig.from_file(run / "config.json", run_dir=str(run))
        check_code_from_file(cfg.model, str(run / "config.json"), args.trust_code)
    except BadValue as e:
        raise BadValue(f"--run: {e}") from None
    stage = args.stage or (stages[0] if stages else None)
    if stage is None or not (run / stage / "best.pt").is_file():
        have = ", ".join(stages) or "none"
        raise BadValue(f"--stage: {run} has no finished stage {stage!r} (stages with a best.pt: {have})")
    for name, value in (("dataset", cfg.dataset), ("image_root", cfg.image_root), ("eps", str(cfg.eps)),
                        ("step_size", str(cfg.step_size)), ("steps", cfg.val_steps), ("norm", cfg.norm),
                        ("precision", cfg.precision), ("seed", cfg.seed)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.out:  # into the run, where roli report finds it; one file per evaluation, none replaced
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")  # (to the second, two in a process collided)
        args.out, args.out_in_run = str(run / stage / "evaluations" / f"{stamp}-{os.getpid()}.json"), True
        if not os.access(run / stage, os.W_OK | os.X_OK):
            raise BadValue(f"--run: {run / stage} is read-only; give --out FILE for the results")
    return cfg, run / stage


def _run_model(
    model_spec: ModelSpec, peft: PeftSpec, stage_dir: Path, num_classes: int, in_chans: int, device
) -> RobustClassifier:
    """The run's model for `stage_dir`: built as the trainer built it (architecture, preprocessing, PEFT
    method of the stage), then the stage's best.pt loaded strictly."""
    from roli.models import apply_peft, load_checkpoint

    try:
        spec = dataclasses.replace(model_spec, checkpoint=None, keep_source_head=False)
        model = spec.build(num_classes, in_chans, device, quiet=True)
        if stage_dir.name in ("alp", "lp"):
            apply_peft(model, "linear")
        elif stage_dir.name != "pretrain":
            peft.apply(model)
        meta = load_checkpoint(model, stage_dir / "best.pt")
    except ValueError as e:  # BadValue included
        raise BadValue(f"--run: {first_line(e)}") from None
    check_written_here(meta.get("run"), stage_dir.parent, stage_dir / "best.pt", "--run")  # its own "--run: "
    val = meta.get("val_robust")
    val = f"{100 * val:.2f}%" if isinstance(val, float) else "-"
    print(f"run: {stage_dir} (best epoch {meta.get('epoch')}, val PGD {val})")
    return model.to(device).eval()


def _check_flags(args) -> tuple[float, float, list[float] | None]:
    """Every flag checked before any data or model is loaded; returns (eps, step size, sweep budgets)."""
    for name, default in (("eps", "8/255"), ("steps", 10), ("norm", "linf"), ("precision", "fp32"), ("seed", 0)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for flag, value, low in (("--steps", args.steps, 0), ("--restarts", args.restarts, 1),
                             ("--batch-size", args.batch_size, 1), ("--n-ex", args.n_ex, 1),
                             ("--num-classes", args.num_classes, 2), ("--input-size", args.input_size, 1)):  # fmt: skip
        if value is not None and value < low:
            raise BadValue(f"{flag} must be >= {low}; got {value}")
    eps = parse_budget(args.eps, "--eps", args.norm)
    step = parse_budget(args.step_size, "--step-size") if args.step_size else eps / 4
    if args.attack == "pgd" and step <= 0:
        raise BadValue("--step-size must be > 0 (with --eps 0, give --step-size explicitly)")
    sweep = [parse_budget(v, "--eps-sweep", args.norm) for v in args.eps_sweep.split(",")] if args.eps_sweep else None
    if args.aa_state and Path(args.aa_state).exists():
        from roli.attacks.autoattack import STATE_FORMAT

        aa_dir = Path(args.aa_state)
        if not aa_dir.is_dir():
            raise BadValue(f"--aa-state: {aa_dir} is a file; give a directory (one state file per batch goes there)")
        for state in sorted(aa_dir.glob("batch*.pt")):  # a corrupt file is reported now, not after other attacks
            try:
                load_tagged(state, STATE_FORMAT, "roli AutoAttack state file (delete it or pass another directory)")
            except ValueError as e:
                raise BadValue(f"--aa-state: {first_line(e)}") from None
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise BadValue(f"--out: {out} is a directory; give a file name for the JSON results")
        parent = out.parent.parent if getattr(args, "out_in_run", False) else out.parent  # evaluations/ made later
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise BadValue(f"--out: cannot write into {out.parent} (missing or read-only)")
        if not getattr(args, "out_in_run", False):
            _check_out_file(out, args)
    return eps, step, sweep


def _check_out_file(out: Path, args) -> None:
    """--out never replaces what roli did not write as an evaluation: an input of this evaluation, a file inside a
    run directory (its evaluations/ folders aside), or an existing file that is not a roli evaluate result."""
    target = out.resolve()
    inputs = [args.checkpoint, str(args.dataset or "").partition(":")[2], args.image_root]
    if any(p and Path(p).expanduser().resolve() == target for p in inputs):
        raise BadValue(f"--out: {out} is an input of this evaluation; give another file name")
    for folder in target.parents:
        if (folder / MARKER).is_file() and target.parent.name != "evaluations":
            raise BadValue(f"--out: {out} lies inside the run directory {folder}; give a file outside it (or no --out "
                           "with --run: the result goes to STAGE/evaluations/)")  # fmt: skip
    if out.is_symlink() or (out.exists() and not _is_result(out)):
        raise BadValue(f"--out: {out} exists and is not a result of roli evaluate; give another file name")


def _is_result(path: Path) -> bool:
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(res, dict) and {"n", "clean", "attacks", "per_example"} <= set(res)


def _device(args) -> torch.device:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise BadValue(f"--device: {args.device!r} is not auto, cpu, cuda or cuda:N")
    try:
        device = torch.device(D.local_device(args.device))
    except RuntimeError:
        raise BadValue(f"--device: {args.device!r} is not a device (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadValue("--device cuda: no CUDA device is available")
    try:
        impl = requested_impl(args.impl)
    except ValueError as e:
        raise BadValue(f"--impl: {e}") from None
    if impl != "auto" and (reason := unavailable_reason(impl, device, torch.float32)):
        raise BadValue(f"--impl {impl} cannot run here: {reason}")
    return device


def _data(
    args, device, spec: DataSpec | None = None, options: dict | None = None, run_dir: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, classes) of the split evaluated. With --run: the run's own splits (`spec`: its class
    subset, label mapping, validation split), checked against the fingerprint in `run_dir` of the run's
    `options`."""
    if spec is not None:
        try:
            splits = dataclasses.replace(spec, dataset=args.dataset, image_root=args.image_root).load()
        except BadValue as e:  # the spec names its field: the dataset (--dataset here) or a setting of the run's
            field, _, reason = first_line(e).partition(": ")
            raise BadValue(f"--dataset: {reason}" if field == "dataset" else f"--run: {first_line(e)}") from None
        try:
            fp = fingerprint(options, splits, getattr(splits[0], "classes", None))
        except ValueError as e:  # an image file that cannot be read
            raise BadValue(f"--dataset: {first_line(e)}") from None
        allowed = "allowed" if args.allow_changed_data else "--allow-changed-data"
        # the run's settings and data as they were when it trained (its own "--run: " refusal)
        args.changed_since_run = check_fingerprint(run_dir, fp, "--run", allowed)
    try:
        if spec is not None:
            data, num_classes = splits[("train", "val", "test").index(args.split)], splits[3]
        else:
            splits = load_dataset(args.dataset, image_root=args.image_root)
            data, num_classes = getattr(splits, args.split), splits.num_classes
        if data is None:
            raise ValueError(f"{args.dataset} has no {args.split} split")
        if args.n_ex is not None:
            data = data.subset(torch.arange(min(args.n_ex, len(data))))
        xs, ys = zip(*data.loader(batch_size=256, device=device, workers=0), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
    except ValueError as e:
        raise BadValue(f"--dataset: {e}") from None
    num_classes = args.num_classes or num_classes
    if args.autoattack and num_classes < 4:
        raise BadValue(f"--autoattack: its DLR loss needs at least 4 classes; this task has {num_classes}")
    if y.numel() and int(y.max()) >= num_classes:
        raise BadValue(f"--num-classes {num_classes} but the labels go up to {int(y.max())}")
    return x, y, num_classes


def evaluate(args) -> dict:
    run = stage_dir = None
    if args.run:
        run, stage_dir = _from_run(args)
    elif args.stage:
        raise BadValue("--stage goes with --run")
    elif not args.model or not args.dataset:
        raise BadValue("give --model and --dataset (or --run RUN_DIR)")
    eps, step, sweep = _check_flags(args)
    device = _device(args)
    if run is None:
        x, y, num_classes = _data(args, device)
        model = _model(args, num_classes, x.shape[1], device)
    else:
        x, y, num_classes = _data(args, device, run.data_spec, run.to_dict(), Path(run.run_dir))
        if D.is_main():  # no trainer (or other evaluation) works in the run meanwhile
            try:
                _HELD.append(RunLock(Path(run.run_dir), "roli evaluate --run").acquire())
            except ValueError as e:
                raise BadValue(f"--run: {e}") from None
        model = _run_model(run.model_spec, run.peft_spec, stage_dir, num_classes, x.shape[1], device)
        evaluated = file_sha256(stage_dir / "best.pt")  # under the run's lock: the file the model was loaded from
    if model.mean is not None and model.mean.shape[1] != x.shape[1]:
        raise BadValue(f"--mean/--std have {model.mean.shape[1]} channels but the images have {x.shape[1]}")
    t0 = time.time()
    results = _attacks(args, model, TensorBatches(x, y, args.batch_size), eps, step, sweep)
    results["seconds"] = round(time.time() - t0, 2)
    results["device"] = str(device)  # --device auto's choice
    results["config"] = {k: v for k, v in vars(args).items()}
    if run is not None:  # which best.pt this evaluated: roli report attaches it to that model only
        results["checkpoint"] = {"file": "best.pt", "sha256": evaluated}
    return results


def _attacks(args, model, data: TensorBatches, eps: float, step: float, sweep: list[float] | None) -> dict:
    """Clean accuracy, then each attack asked for (one roli.attacks.evaluation.Evaluation); the worst case over
    all of them, per example."""
    if args.autoattack and D.is_main():
        print(
            f"evaluate: AutoAttack-{args.autoattack} on {len(data.y)} images in {data.total} batches (a progress "
            f"line at most every {_env.progress_seconds():g} s: ROLI_PROGRESS_SECONDS)",
            file=sys.stderr,
            flush=True,
        )
    evaluation = Evaluation(
        eps,
        step,
        args.steps,
        pgd=args.attack == "pgd",
        norm=args.norm,
        restarts=args.restarts,
        loss=args.loss,
        precision=args.precision,
        impl=args.impl,
        seed=args.seed,
        sweep=tuple(sweep or ()),
        autoattack=args.autoattack,
        sweep_chunk=args.batch_size,
    )
    if args.aa_state:
        Path(args.aa_state).mkdir(parents=True, exist_ok=True)
        # a killed evaluation's half-written state file (atomic_write's ".batch<i>.pt.<8 random>.tmp"), by name
        ours = re.compile(r"\.batch\d+\.pt\.\w{8}\.tmp")
        remove_stale_temporaries(args.aa_state, lambda rel: ours.fullmatch(rel) is not None)
    try:
        outcomes = evaluation.run(
            model, data, state_dir=args.aa_state, report=_report, aa_progress=lambda i: _aa_progress(i, data.total)
        )
    except AutoAttackStateError as e:  # a state file of another model or evaluation, or a corrupt one
        raise BadValue(f"--aa-state: {e}") from None
    flags = outcomes.per_example(data.parts, len(data.y), data.y.device)
    totals = outcomes.totals()
    n = len(data.y)
    results: dict = {
        "n": n,
        "processes": D.world(),
        "clean": _fraction(flags["clean"]),
        "attacks": {},
        "per_example": {"clean": _bits(flags["clean"])},
    }
    robust = flags["clean"].clone()
    if "pgd" in flags:
        robust &= flags["pgd"]
        restarts = f", {args.restarts} restarts" if args.restarts > 1 else ""
        results["attacks"][f"PGD-{args.steps} ({args.norm}, eps={budget_text(eps)}{restarts})"] = _fraction(
            flags["pgd"]
        )
        results["per_example"]["pgd"] = _bits(flags["pgd"])
        if "pgd_reference" in flags:  # the same attack pass scored as the RoLI reference code does
            label = f"PGD-{args.steps} reference scoring (per batch of {evaluation.reference_batch})"
            results["attacks_reference_scoring"] = {label: _fraction(flags["pgd_reference"])}
            results["per_example"]["pgd_reference"] = _bits(flags["pgd_reference"])
    if sweep:
        results["eps_sweep"] = {f"{e:.6g}": c / max(1, n) for e, c in zip(sweep, totals["sweep"], strict=True)}
    if "autoattack" in flags:
        aa = flags["autoattack"]
        robust &= aa
        results["attacks"][f"AutoAttack-{args.autoattack} ({args.norm}, eps={budget_text(eps)})"] = _fraction(aa)
        results["autoattack_per_attack"] = {k: t / max(1, n) for k, t in totals["aa_per_attack"].items()}
        results["per_example"]["autoattack"] = _bits(aa)
        results["autoattack_warnings"] = Evaluation.warnings(totals)
    results["worst_case"] = _fraction(robust)
    results["per_example"]["worst_case"] = _bits(robust)
    return results


def _report(line: str) -> None:
    print(f"evaluate: {line}", file=sys.stderr, flush=True)


def render(results: dict) -> str:
    rows = [("clean", results["clean"])] + list(results["attacks"].items())
    if results["attacks"]:
        rows.append(("worst case (all attacks)", results["worst_case"]))
    rows += list(results.get("attacks_reference_scoring", {}).items())
    rows += [(f"PGD sweep eps={budget_text(float(e))}", a) for e, a in results.get("eps_sweep", {}).items()]
    width = max(len("evaluation"), *(len(r[0]) for r in rows))
    lines = [f"{'evaluation':<{width}} | accuracy", f"{'-' * width}-|---------"]
    lines += [f"{name:<{width}} | {100 * acc:7.2f}%" for name, acc in rows]
    procs = f", {results['processes']} processes" if results.get("processes", 1) > 1 else ""
    device = f", {results['device']}" if "device" in results else ""
    return "\n".join(lines) + f"\n({results['n']} examples, {results['seconds']} s{procs}{device})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.device = auto_device(args.device)
    try:
        D.init_from_env(args.device)
        results = evaluate(args)
        if D.is_main():  # one result, written once
            print(render(results))
            if args.out:
                if getattr(args, "out_in_run", False):
                    Path(args.out).parent.mkdir(exist_ok=True)  # the run's STAGE/evaluations/
                save_json(results, args.out)
                print(f"results written to {args.out}")
    except BadValue as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        while _HELD:
            _HELD.pop().release()
        D.shutdown()  # a gloo group left alive at exit aborts the process
    return 0


if __name__ == "__main__":
    from roli._cli import exit_with

    exit_with(main)
