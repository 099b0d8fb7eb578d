"""Benchmark of the fused PGD step (pgd_step_) against the eager update chain users write today.

Providers: eager_chain (the 7-op update as torchattacks writes it), torch (roli's reference),
compiled (torch.compile of the reference), cpp, and on a GPU triton and cuda. Every provider is
checked against the float64 reference first; then each is timed with warm-up and medians.
GB/s counts 4 passes (read x_adv, grad, x_nat; write x_adv) and is compared with a large copy_
measured in the same run. Results: a Markdown table on stdout and in benchmarks/results/, and CSV rows
appended to benchmarks/results/bench_pgd_step.csv (with date, device and versions).

    python benchmarks/bench_pgd_step.py                 # all shapes, fp32 + bf16, Linf
    python benchmarks/bench_pgd_step.py --quick         # fewer repetitions, no torch.compile
    python benchmarks/bench_pgd_step.py --norm l2 --dtypes fp32
"""

from __future__ import annotations

import os

# Compile in-process: a pool of inductor compile workers left running would steal the CPU from timings.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import csv
import datetime as dt  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _common import device_name, timer  # noqa: E402

import roli  # noqa: E402
from roli import _ext  # noqa: E402
from roli.ops import pgd_step_, pgd_step_l2_torch, pgd_step_linf_torch, unavailable_reason  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(128, 3, 224, 224), (512, 3, 32, 32), (64, 3, 32, 32)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS, STEP = 8 / 255, 2 / 255
L2_EPS, L2_STEP = 0.5, 0.1


def eager_chain_linf(x_adv, grad, x_nat):
    # torchattacks PGD.forward, the update part: sign, mul, add, sub, clamp, add, clamp (7 ops).
    adv = x_adv.detach() + STEP * grad.sign()
    delta = torch.clamp(adv - x_nat, min=-EPS, max=EPS)
    return torch.clamp(x_nat + delta, min=0, max=1).detach()


def eager_chain_l2(x_adv, grad, x_nat):
    # torchattacks PGDL2.forward, the update part.
    b = len(x_adv)
    grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10
    adv = x_adv.detach() + L2_STEP * grad / grad_norms.view(b, 1, 1, 1)
    delta = adv - x_nat
    factor = torch.min(L2_EPS / torch.norm(delta.view(b, -1), p=2, dim=1), torch.ones_like(grad_norms))
    return torch.clamp(x_nat + delta * factor.view(-1, 1, 1, 1), min=0, max=1).detach()


def measure(fn, device, reps, warmup=3):
    run = timer(device)
    run(fn, warmup)
    ts = sorted(run(fn, reps))
    q = statistics.quantiles(ts, n=10) if len(ts) >= 10 else [ts[0]] * 2 + [ts[len(ts) // 2]] * 5 + [ts[-1]] * 2
    return {"p20": q[1], "p50": statistics.median(ts), "p80": q[7]}


def copy_bandwidth(device, reps) -> float:
    src = torch.rand(128 * 3 * 224 * 224, device=device)  # 77 MB: far beyond the caches
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, reps)["p50"]
    return 2 * src.numel() * src.element_size() / t / 1e9


def providers(device, norm, use_compile):
    torch_fn = pgd_step_linf_torch if norm == "linf" else pgd_step_l2_torch
    eps, step = (EPS, STEP) if norm == "linf" else (L2_EPS, L2_STEP)
    out = {"eager_chain": (eager_chain_linf if norm == "linf" else eager_chain_l2), "torch": None}
    if use_compile:
        out["compiled"] = torch.compile(
            lambda x, g, n: torch_fn(x, g, n, None, eps, None, step, 0.0, 1.0), dynamic=False
        )
    for impl in ("cpp", "triton", "cuda"):
        if unavailable_reason(impl, device, torch.float32) is None:
            out[impl] = None
    calls = {}
    for name, fn in out.items():
        if name == "eager_chain":
            calls[name] = (fn, False)  # out of place, as torchattacks does
        elif name == "compiled":
            calls[name] = (fn, True)
        else:
            calls[name] = (
                (lambda impl: lambda x, g, n: pgd_step_(x, g, n, eps, step, norm=norm, impl=impl))(name),
                True,
            )
    return calls, eps, step


def bind(fn, *args):
    return lambda: fn(*args)


def tolerance(name: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-6
    # bf16 values below 1: one ulp is 2^-8 at most. The eager chain rounds every intermediate to bf16.
    return 4 * 2**-8 if name == "eager_chain" else 2**-8


def reference(x, g, n, eps, step, norm):
    y = x.double().clone()
    (pgd_step_linf_torch if norm == "linf" else pgd_step_l2_torch)(
        y, g.double(), n.double(), None, eps, None, step, 0, 1
    )
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--norm", choices=["linf", "l2"], default="linf")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and no torch.compile provider")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--out", default=str(RESULTS), help="directory for the CSV and Markdown results")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"--dtypes: unknown {bad}; use fp32 and/or bf16")
    _ext.load()
    reps_big, reps_small = (5, 30) if args.quick else (15, 100)
    copy_gbs = copy_bandwidth(device, reps_big)
    calls, eps, step = providers(device, args.norm, use_compile=not (args.quick or args.no_compile))
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in SHAPES:
        for dname in dtypes:
            dtype = DTYPES[dname]
            x_nat = torch.rand(shape, generator=gen, device=device).to(dtype)
            grad = torch.randn(shape, generator=gen, device=device).to(dtype)
            x0 = (x_nat.float() + (torch.rand(shape, generator=gen, device=device) * 2 - 1) * eps).clamp(0, 1).to(dtype)
            want = reference(x0, grad, x_nat, eps, step, args.norm)
            nbytes = 4 * x0.numel() * x0.element_size()
            reps = reps_big if x0.numel() > 5e6 else reps_small
            base = None
            for name, (fn, in_place) in calls.items():
                if name in ("cpp", "triton", "cuda") and unavailable_reason(name, device, dtype):
                    continue
                x = x0.clone()
                res = fn(x, grad, x_nat)
                err = ((x if in_place else res).double() - want).abs().max().item()
                if err > tolerance(name, dtype):
                    raise SystemExit(f"{name} {shape} {dname}: max error {err:.3g} vs the float64 reference")
                x = x0.clone()
                t = measure(bind(fn, x, grad, x_nat), device, reps)
                base = t["p50"] if name == "eager_chain" else base
                rows.append(
                    {
                        "provider": name,
                        "shape": "x".join(map(str, shape)),
                        "dtype": dname,
                        "norm": args.norm,
                        "p20_ms": t["p20"] * 1e3,
                        "p50_ms": t["p50"] * 1e3,
                        "p80_ms": t["p80"] * 1e3,
                        "GBps": nbytes / t["p50"] / 1e9,
                        "pct_copy": 100 * nbytes / t["p50"] / 1e9 / copy_gbs,
                        "speedup_vs_eager": base / t["p50"],
                        "max_err": err,
                    }
                )
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = {
        "date": stamp,
        "device": device_name(device),
        "torch": torch.__version__,
        "roli": roli.__version__,
        "triton": _triton_version(),
        "copy_GBps": round(copy_gbs, 1),
    }
    table = render(rows, meta)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_pgd_step_{args.norm}_{device.type}.md").write_text(table + "\n")
    csv_path = out / "bench_pgd_step.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}})


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def render(rows, meta) -> str:
    head = (
        f"pgd_step_ ({rows[0]['norm']}) on {meta['device']}, {meta['date']}; torch {meta['torch']}, "
        f"triton {meta['triton']}; same-run copy_ bandwidth {meta['copy_GBps']} GB/s"
    )
    cols = "| shape | dtype | provider | median ms | GB/s (4 passes) | % of copy_ | speedup vs eager chain |"
    lines = [head, "", cols, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['p50_ms']:.3f} | {r['GBps']:.1f} | "
            f"{r['pct_copy']:.0f}% | {r['speedup_vs_eager']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
