"""What an fp8 attack (PGD(precision="fp8"), --attack-precision fp8) costs in attack strength and in the trained
model, measured against the bf16 attack on the same inputs (gpu_check.sh's fp8 stage).

  (a) sign agreement: the input gradient's sign (one FGSM step's direction) of the fp8 and the bf16 attack
      with the fp32 one, per pixel, on the same batch: ViT-B/16 and Swin-B at 224 (random weights, seed 0;
      nothing is downloaded), and the small ViT of (c);
  (b) attack strength: PGD-10 robust accuracy of one trained model (the bf16-trained model of (c)) attacked
      with fp8 and with bf16 PGD on the same test images;
  (c) training: a small ViT (vit_tiny, patch 4, 32x32) trained from scratch with PGD-7 (eps 8/255) twice, the
      training attack in bf16 and in fp8 (update bf16 both times, the same seed and batches), then clean /
      PGD-10 / AutoAttack-lite (APGD-CE + APGD-T, the first --aa-images test images) of each, all in bf16.
Data for (b)-(c): --dataset npz:PATH (x_train/y_train/x_test/y_test, e.g. a CIFAR-10 subset), else
scikit-learn's digits resized to 32x32 RGB (a weak regime: say which ran). Results: bench_fp8_<device>.md and
bench_fp8.csv.

    python benchmarks/bench_fp8.py [--device cuda] [--dataset npz:cifar10_sub.npz] [--epochs 10] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import publish

from roli.attacks import PGD, robust_accuracy, run_autoattack
from roli.models import create_classifier
from roli.models.fp8 import fp8_supported
from roli.training.loop import ft_step, make_optimizer, param_groups

RESULTS = Path(__file__).resolve().parent / "results"
EPS, ALPHA = 8 / 255, 2 / 255
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def small_vit(num_classes: int):
    return create_classifier("vit_tiny_patch16_224", num_classes, img_size=32, patch_size=4, input_size=None,
                             mean=(0.5,) * 3, std=(0.25,) * 3)  # fmt: skip


def sign_agreement(model, x, y) -> dict:
    """Per-pixel agreement of one FGSM step's direction (the input gradient's sign) between precisions."""
    signs = {}
    for precision in ("fp32", "bf16", "fp8"):
        attack = PGD(model, eps=EPS, step_size=EPS, steps=1, random_start=False, keep="last", precision=precision)
        signs[precision] = (attack(x, y) - x).sign()
    agree = {p: float((signs[p] == signs["fp32"]).float().mean()) for p in ("bf16", "fp8")}
    agree["fp8 vs bf16"] = float((signs["fp8"] == signs["bf16"]).float().mean())
    return agree


def load(spec: str | None, device) -> tuple:
    """(x_train, y_train, x_test, y_test, num_classes, name) as float tensors on `device`, 3x32x32."""
    from roli.data import arrays

    if spec:
        train, test = arrays.npz(spec.removeprefix("npz:"))
        name = Path(spec.removeprefix("npz:")).name
    else:
        train, test = arrays.digits()
        name = "digits (scikit-learn, resized to 32x32 RGB)"

    def prep(d):
        x, y = d.to_float(device)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
        return x.contiguous(), y

    (xt, yt), (xe, ye) = prep(train), prep(test)
    return xt, yt, xe, ye, train.num_classes, name


def train(attack_precision: str, data: tuple, epochs: int, batch: int, device) -> tuple:
    """A small ViT trained from scratch with PGD-7 in `attack_precision` (update bf16): (model, seconds)."""
    xt, yt, *_, num_classes, _ = data
    torch.manual_seed(0)
    model = small_vit(num_classes).to(device)
    attack = PGD(model, eps=EPS, step_size=ALPHA, steps=7, keep="last", precision=attack_precision, seed=0,
                 deferred=True)  # fmt: skip
    opt = make_optimizer(param_groups(model, 0.05), "adamw", 1e-3, 0.9)
    steps = epochs * (len(yt) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.2)
    order = torch.Generator(device="cpu").manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=order).to(device)
        for i in range(len(yt) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            ft_step(model, attack, opt, xt[idx], yt[idx], "bf16")
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model.eval(), time.perf_counter() - start


def evaluate(model, xe, ye, aa_images: int) -> dict:
    clean, pgd = robust_accuracy(model, (xe, ye), EPS, ALPHA, steps=10, precision="bf16")
    aa = run_autoattack(model, (xe[:aa_images], ye[:aa_images]), EPS, version="custom",
                        attacks=["apgd-ce", "apgd-t"], precision="bf16")  # fmt: skip
    return {"clean": clean, "pgd10": pgd, "aa_lite": aa.robust_accuracy, "aa_n": aa_images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dataset", help="npz:PATH (x_train, y_train, x_test, y_test); default: digits")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--aa-images", type=int, default=500)
    ap.add_argument("--big", default="vitb,swinb", help="(a)'s 224 models (empty: none; ViT-B and Swin-B)")
    ap.add_argument("--quick", action="store_true", help="a CPU dry run: 256 images for 1 epoch, 64 test images, 16 "
                    "for AutoAttack, no 224 models")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    ok, why = fp8_supported(device)
    if not ok:
        raise SystemExit(f"bench_fp8: {why}")
    if args.quick:
        args.epochs, args.aa_images, args.big = 1, 16, ""
    rows = []
    data = load(args.dataset, device)
    if args.quick:  # a dry run of every part: 256 training and 64 test images
        data = (data[0][:256], data[1][:256], data[2][:64], data[3][:64], *data[4:])
    xt, yt, xe, ye, num_classes, name = data
    torch.manual_seed(0)
    big = {"vitb": ("vit_base_patch16_224", 224), "swinb": ("swin_base_patch4_window7_224", 224)}
    for key in [k for k in args.big.split(",") if k]:
        arch, size = big[key]
        model = create_classifier(arch, num_classes, input_size=None, **IMAGENET).to(device).eval()
        x = torch.rand(32, 3, size, size, device=device) * 0.5 + 0.25  # inside [0, 1] after any step: no clipping
        y = torch.randint(0, num_classes, (32,), device=device)
        agree = sign_agreement(model, x, y)
        rows.append({"what": "(a) sign agreement", "model": arch, "bf16": agree["bf16"], "fp8": agree["fp8"],
                     "note": f"fp8 vs bf16 {100 * agree['fp8 vs bf16']:.1f}% (batch 32, random weights)"})  # fmt: skip
        del model
    models, seconds = {}, {}
    for precision in ("bf16", "fp8"):
        models[precision], seconds[precision] = train(precision, data, args.epochs, args.batch, device)
    agree = sign_agreement(models["bf16"], xe[:64], ye[:64])
    note = f"fp8 vs bf16 {100 * agree['fp8 vs bf16']:.1f}% (64 test images)"
    rows.append({"what": "(a) sign agreement", "model": "vit_tiny/4 @32 (trained, bf16)", "bf16": agree["bf16"],
                 "fp8": agree["fp8"], "note": note})  # fmt: skip
    strength = {
        p: robust_accuracy(models["bf16"], (xe, ye), EPS, ALPHA, steps=10, precision=p)[1] for p in ("bf16", "fp8")
    }
    rows.append({"what": "(b) PGD-10 robust accuracy of the bf16-trained model", "model": "vit_tiny/4 @32",
                 "bf16": strength["bf16"], "fp8": strength["fp8"],
                 "note": "attacked with bf16 vs fp8 PGD-10 (a higher figure: a weaker attack)"})  # fmt: skip
    results = {p: evaluate(models[p], xe, ye, min(args.aa_images, len(ye))) for p in models}
    for metric, label in (("clean", "clean"), ("pgd10", "PGD-10 (bf16)"), ("aa_lite", "AutoAttack-lite")):
        rows.append({"what": f"(c) trained with a bf16 / fp8 attack: test {label}", "model": "vit_tiny/4 @32",
                     "bf16": results["bf16"][metric], "fp8": results["fp8"][metric],
                     "note": f"{args.epochs} epochs, {len(yt)} train / {len(ye)} test images of {name}"
                     + (f", AA on the first {results['bf16']['aa_n']}" if metric == "aa_lite" else "")})  # fmt: skip
    rows.append({"what": "(c) training time (s)", "model": "vit_tiny/4 @32", "bf16": seconds["bf16"],
                 "fp8": seconds["fp8"], "note": "wall, whole training (the small ViT's GEMMs are tiny)"})  # fmt: skip

    def cells(r):
        pct = "time" not in r["what"]
        fmt = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.1f}")
        return [r["what"], r["model"], fmt(r["bf16"]), fmt(r["fp8"]), r["note"]]

    title = f"fp8 vs bf16 attack passes (eps 8/255; data: {name})"
    publish(args.out, "bench_fp8", title, {}, ["measure", "model", "bf16", "fp8", "note"], cells, rows, device)


if __name__ == "__main__":
    main()
