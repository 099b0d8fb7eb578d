"""Per-step launch overhead: the operator events one PGD-7 finetuning step issues, and its time.

On a GPU each operator event is (at least) one kernel launch: hundreds of tiny launches per step are what CUDA
graphs and small models feel most. On a CPU the torch profiler counts the same events, so the count is
measured here on any machine. One step as the trainer runs it: roli's PGD-7 (keep="last", BatchNorm folded,
checks deferred to a device flag), then the update with torch's fused AdamW.

Usage: python benchmarks/bench_launches.py [--models resnet18,cnn] [--batch 32] [--reps 15]
Prints one row per model: aten operator events, kernel launches (innermost compute operators; a foreach
operator once, as on CUDA), median step seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_train import MODELS
from torch.profiler import ProfilerActivity, profile

from roli.attacks import PGD
from roli.training.loop import ft_step, make_optimizer, param_groups


def step_of(name: str, batch: int):
    torch.manual_seed(0)
    model = MODELS[name]()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    attack = PGD(model, eps=8 / 255, step_size=2 / 255, steps=7, keep="last", seed=0, deferred=True)
    opt = make_optimizer(param_groups(model, 0.0), "adamw", 1e-5, 0.9)

    def step():
        loss, _ = ft_step(model, attack, opt, x, y)
        attack.pop_invalid()
        return loss

    return step


# Leaf operators that launch no kernel: allocation, views and metadata (and the CPU's scalar reads).
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::as_strided", "aten::as_strided_", "aten::resize_",
             "aten::view", "aten::_unsafe_view", "aten::_reshape_alias", "aten::detach", "aten::alias",
             "aten::resolve_conj", "aten::resolve_neg", "aten::promote_types", "aten::result_type",
             "aten::_local_scalar_dense", "aten::expand", "aten::t", "aten::transpose", "aten::permute",
             "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::lift_fresh", "aten::to",
             "aten::_to_copy_noop", "aten::is_nonzero", "aten::item"}  # fmt: skip


def _kernels(event) -> int:
    """Kernel launches under an operator event: the innermost compute operators (allocation, views and metadata
    launch none); a multi-tensor `_foreach_` operator counts once, as its CUDA fast path launches (on a CPU it
    loops over its tensors)."""
    if event.name.startswith("aten::_foreach_"):
        return 1
    inner = sum(_kernels(c) for c in event.cpu_children if c.name.startswith("aten::"))
    return inner if inner or event.name in NO_KERNEL else 1


def count_events(step) -> tuple[int, int]:
    """(aten operator events, kernel launches) of one call of `step`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    roots = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events), sum(_kernels(e) for e in roots)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,cnn")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", action="store_true", help="one JSON line per model instead of the table")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        step = step_of(name, args.batch)
        for _ in range(3):  # warm-up: folding traced, allocator, oneDNN primitives
            step()
        events, leaves = count_events(step)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "model": name,
                "batch": args.batch,
                "events": events,
                "kernels": leaves,
                "seconds": statistics.median(times),
            }
        )
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print("| model | batch | aten events | kernel launches (leaf ops) | median step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['events']} | {r['kernels']} | {1000 * r['seconds']:.1f} ms |")


if __name__ == "__main__":
    main()
