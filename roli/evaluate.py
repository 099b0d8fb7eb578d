"""`python -m roli.evaluate`: clean, PGD, eps-sweep and AutoAttack accuracy of a model on a dataset.

    python -m roli.evaluate --model mypkg.nets:small_cnn --checkpoint net.pt --dataset digits \\
        --attack pgd --steps 10 --eps 0.1 --eps-sweep 0.02,0.05,0.1 --autoattack standard --out res.json

Budgets accept fractions ("8/255"). The worst case counts a sample as robust only if it is correct on
the clean image and under every attack that ran. Results print as a table and are written as JSON
(atomically: an interrupted run never leaves a half-written file in place of a good one).
"""

from __future__ import annotations

import sys
import time

import torch

from roli._cli import BadValue, OneLineParser, parse_budget, parse_kwargs
from roli._io import save_json
from roli.attacks import PGD, clean_correct, eps_sweep, run_autoattack
from roli.attacks.autoattack import VERSIONS as AA_VERSIONS
from roli.data import ArrayData, load_dataset
from roli.models import RobustClassifier, create_classifier, load_pretrained, resolve_checkpoint
from roli.ops import unavailable_reason
from roli.ops._dispatch import requested_impl

CliError = BadValue  # a bad flag value: one line, exit code 2


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"{flag}: expected comma-separated numbers; got {text!r}") from None


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m roli.evaluate", description=__doc__.split("\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a published robust backbone (python -m roli.zoo), a timm name "
                   "or 'package.module:function' (an nn.Module factory)")  # fmt: skip
    g.add_argument("--checkpoint", help="weights (.pt/.pth/.bin/.safetensors; timm, ARES, RobustBench, MadryLab, "
                   "RoLI-reference or roli format) holding the classifier to evaluate")  # fmt: skip
    g.add_argument("--non-strict", action="store_true", help="load a checkpoint with missing/unexpected keys")
    g.add_argument("--ema", action="store_true", help="load the checkpoint's EMA weights (timm CheckpointSaver files)")
    g.add_argument(
        "--download",
        action="store_true",
        help="registry backbones: fetch the file into the cache when no --checkpoint is given",
    )
    g.add_argument("--timm-pretrained", action="store_true", help="start from timm's weights (needs a reachable hub)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the model constructor, e.g. img_size=32 (repeatable)")  # fmt: skip
    g.add_argument("--num-classes", type=int, help="classes of the model (default: the dataset's)")
    g.add_argument("--mean", help="per-channel mean applied inside the model, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="per-channel std applied inside the model")
    g.add_argument("--input-size", type=int, help="resize images to this size inside the model")
    g.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic"], help="of that resize")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True,
                   help="digits, npz:PATH, cifar10:ROOT, cifar100:ROOT, imagefolder:ROOT or json:DIR")  # fmt: skip
    g.add_argument("--image-root", help="image root of a json:DIR dataset (default: DIR)")
    g.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to evaluate")
    g.add_argument("--n-ex", type=int, help="evaluate the first N examples only")
    g.add_argument("--batch-size", type=int, default=256, help="images per attack batch")
    g = p.add_argument_group("attacks")
    g.add_argument("--attack", default="pgd", choices=["pgd", "none"], help="the PGD attack, or none")
    g.add_argument("--norm", default="linf", choices=["linf", "l2"], help="threat model")
    g.add_argument("--eps", default="8/255", help="budget, a number or a fraction like 8/255")
    g.add_argument("--step-size", help="PGD step (default: eps/4, i.e. 2/255 for 8/255)")
    g.add_argument("--steps", type=int, default=10, help="PGD steps")
    g.add_argument("--restarts", type=int, default=1, help="PGD random restarts (per-sample worst case)")
    g.add_argument("--loss", default="ce", choices=["ce", "dlr"], help="PGD loss")
    g.add_argument("--eps-sweep", help="comma-separated budgets, all attacked in one batched run")
    g.add_argument("--autoattack", choices=[v for v in AA_VERSIONS if v != "custom"], help="also run AutoAttack")
    g.add_argument("--aa-state", help="AutoAttack state file: an interrupted evaluation resumes from it")
    g = p.add_argument_group("run")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="forward/backward precision")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--impl", help="backend of the fused ops: auto, torch, cpp, cuda, triton")
    g.add_argument("--seed", type=int, default=0, help="seeds the random starts")
    g.add_argument("--out", help="write the results as JSON here")
    return p


def _model(args, num_classes: int, in_chans: int, device: torch.device) -> RobustClassifier:
    mean = parse_floats(args.mean, "--mean") if args.mean else "auto"
    std = parse_floats(args.std, "--std") if args.std else "auto"
    if (mean == "auto") != (std == "auto"):
        raise CliError("--mean and --std go together")
    try:
        model = create_classifier(args.model, num_classes, mean=mean, std=std, in_chans=in_chans,
                                  input_size=args.input_size or "auto", interpolation=args.interpolation,
                                  pretrained=args.timm_pretrained, **parse_kwargs(args.model_arg))  # fmt: skip
        checkpoint = resolve_checkpoint(args.model, args.checkpoint, args.download)
    except (ValueError, TypeError) as e:
        raise CliError(f"--model: {e}") from None
    head_from = None
    if checkpoint:
        try:
            report = load_pretrained(model, checkpoint, strict=not args.non_strict, keep_head=True, ema=args.ema)
        except ValueError as e:
            raise CliError(f"--checkpoint: {e}") from None
        print(f"checkpoint: {report}")
        head_from = "the checkpoint" if report.head_loaded else None
    if head_from is None and model.classifier_key is None and model.feat_dim == num_classes:
        # A module without a classifier of its own that returns num_classes outputs: its outputs are the
        # logits, so the whole module is the classifier (an identity head, exact in any precision).
        with torch.no_grad():
            model.head.weight.copy_(torch.eye(num_classes))
            model.head.bias.zero_()
        head_from = "the model's own outputs (it returns logits for the task's classes)"
        print(f"classifier: {args.model} returns {num_classes} outputs: evaluated as the whole classifier")
    if head_from is None and not args.timm_pretrained:
        why = report.head if checkpoint else "no --checkpoint"
        raise CliError(f"nothing supplies a classifier for {num_classes} classes ({why}): evaluate a checkpoint that "
                       "holds one (a roli run's best.pt, a model trained on these labels), or set --num-classes to "
                       "its class count")  # fmt: skip
    return model.to(device).eval()


def _images(data, n: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, ArrayData):
        if n is not None:
            data = data.subset(torch.arange(min(n, len(data))))
        return data.to_float(device)
    if n is not None:
        data = data.subset(torch.arange(min(n, len(data))))
    xs, ys = zip(*data.loader(batch_size=64, device=device, workers=0), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _batches(n: int, size: int):
    return [slice(i, i + size) for i in range(0, n, size)]


def evaluate(args) -> dict:
    for flag, value, low in (("--steps", args.steps, 0), ("--restarts", args.restarts, 1),
                             ("--batch-size", args.batch_size, 1)):  # fmt: skip
        if value < low:
            raise CliError(f"{flag} must be >= {low}; got {value}")
    if args.n_ex is not None and args.n_ex < 1:
        raise CliError(f"--n-ex must be >= 1; got {args.n_ex}")
    eps = parse_budget(args.eps, "--eps")
    step = parse_budget(args.step_size, "--step-size") if args.step_size else eps / 4
    if args.attack == "pgd" and step <= 0:
        raise CliError("--step-size must be > 0 (with --eps 0, give --step-size explicitly)")
    sweep = [parse_budget(v, "--eps-sweep") for v in args.eps_sweep.split(",")] if args.eps_sweep else None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"--device: {args.device!r} is not a device (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    try:
        impl = requested_impl(args.impl)
    except ValueError as e:
        raise CliError(f"--impl: {e}") from None
    if impl != "auto" and (reason := unavailable_reason(impl, device, torch.float32)):
        raise CliError(f"--impl {impl} cannot run here: {reason}")
    try:
        splits = load_dataset(args.dataset, image_root=args.image_root)
        data = getattr(splits, args.split)
        if data is None:
            raise ValueError(f"{args.dataset} has no {args.split} split")
        x, y = _images(data, args.n_ex, device)
    except ValueError as e:
        raise CliError(f"--dataset: {e}") from None
    num_classes = args.num_classes or splits.num_classes
    if y.numel() and int(y.max()) >= num_classes:
        raise CliError(f"--num-classes {num_classes} but the labels go up to {int(y.max())}")
    model = _model(args, num_classes, x.shape[1], device)
    if model.mean is not None and model.mean.shape[1] != x.shape[1]:
        raise CliError(f"--mean/--std have {model.mean.shape[1]} channels but the images have {x.shape[1]}")
    t0 = time.time()
    parts = _batches(len(y), args.batch_size)
    clean = torch.cat([clean_correct(model, x[s], y[s], args.precision) for s in parts])
    robust = clean.clone()
    results: dict = {"n": len(y), "clean": float(clean.float().mean()), "attacks": {}}
    if args.attack == "pgd":
        attack = PGD(model, eps=eps, step_size=step, steps=args.steps, norm=args.norm, restarts=args.restarts,
                     loss=args.loss, keep="best", early_stop=True, precision=args.precision, impl=args.impl,
                     seed=args.seed)  # fmt: skip
        broken = torch.cat([attack.perturb(x[s], y[s]).success for s in parts])
        pgd_ok = clean & ~broken
        robust &= pgd_ok
        name = f"PGD-{args.steps} ({args.norm}, eps={args.eps}" + (
            f", {args.restarts} restarts)" if args.restarts > 1 else ")"
        )
        results["attacks"][name] = float(pgd_ok.float().mean())
    if sweep:
        accs = eps_sweep(model, x, y, sweep, steps=args.steps, norm=args.norm, restarts=args.restarts,
                         loss=args.loss, precision=args.precision, impl=args.impl, seed=args.seed,
                         chunk_size=args.batch_size)  # fmt: skip
        results["eps_sweep"] = {f"{e:.6g}": a for e, a in accs.items()}
    if args.autoattack:
        aa = run_autoattack(model, x, y, eps, norm=args.norm, version=args.autoattack, state_path=args.aa_state,
                            batch_size=args.batch_size, seed=args.seed, precision=args.precision)  # fmt: skip
        results["attacks"][f"AutoAttack-{args.autoattack} ({args.norm}, eps={args.eps})"] = aa.robust_accuracy
        results["autoattack_per_attack"] = aa.per_attack
        robust &= aa.robust.to(robust.device)
    results["worst_case"] = float(robust.float().mean())
    results["seconds"] = round(time.time() - t0, 2)
    results["config"] = {k: v for k, v in vars(args).items()}
    return results


def render(results: dict) -> str:
    rows = [("clean", results["clean"])] + list(results["attacks"].items())
    if results["attacks"]:
        rows.append(("worst case (all attacks)", results["worst_case"]))
    rows += [(f"PGD sweep eps={e}", a) for e, a in results.get("eps_sweep", {}).items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'evaluation':<{width}} | accuracy", f"{'-' * width}-|---------"]
    lines += [f"{name:<{width}} | {100 * acc:7.2f}%" for name, acc in rows]
    return "\n".join(lines) + f"\n({results['n']} examples, {results['seconds']} s)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = evaluate(args)
    except CliError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(render(results))
    if args.out:
        save_json(results, args.out)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
