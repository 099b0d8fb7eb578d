"""Shared by the benchmark scripts: the machine's name, round-robin timing, writing the results."""

from __future__ import annotations

import csv
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import roli

NO_TORCHATTACKS = "torchattacks is not installed: its rows are left out"


def optional_torchattacks():
    """The torchattacks module, or None (a GPU machine without network may lack it): its rows are then skipped
    with a note on stderr and in the table's title; ours are still measured."""
    try:
        import torchattacks
    except ImportError:
        import sys

        print(f"note: {NO_TORCHATTACKS} (pip install torchattacks to compare)", file=sys.stderr)
        return None
    return torchattacks


def ratio(value: float | None) -> str:
    """A speed ratio cell; n/a where the peer was not measured."""
    return "n/a" if value is None else f"{value:.2f}x"


def cpu_name() -> str:
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} CPU, {torch.get_num_threads()} threads"


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def timed(fn, device: torch.device | str = "cpu") -> float:
    """Seconds of one call of fn. On a GPU: CUDA events around it on the current stream, then a sync (the
    device's time, launch gaps included); elsewhere perf_counter."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timer(device: torch.device | str = "cpu"):
    """run(fn, reps) -> the seconds of each of reps calls."""
    return lambda fn, reps: [timed(fn, device) for _ in range(reps)]


def round_robin(runs: dict, reps: int, warmup: int = 1, device: torch.device | str = "cpu") -> dict:
    """Median seconds per run, every variant once per round (after `warmup` rounds), so that load drift on
    a shared machine affects all variants alike."""
    times = {label: [] for label in runs}
    for r in range(warmup + reps):
        for label, run in runs.items():
            t = timed(run, device)
            if r >= warmup:
                times[label].append(t)
    return {label: statistics.median(ts) for label, ts in times.items()}


def round_robin_spread(
    runs: dict, reps: int, warmup: int = 2, device: torch.device | str = "cpu", steps: int = 10
) -> dict:
    """{label: (median, min, max)} seconds per call: in each of warmup + reps rounds every variant runs `steps`
    calls back to back, timed as one block (CUDA events on a GPU), the variants interleaved round by round."""
    times = {label: [] for label in runs}
    for r in range(warmup + reps):
        for label, run in runs.items():
            t = timed(lambda run=run: [run() for _ in range(steps)], device) / steps
            if r >= warmup:
                times[label].append(t)
    return {label: (statistics.median(ts), min(ts), max(ts)) for label, ts in times.items()}


def host_syncs(fn, device: torch.device | str = "cpu") -> int | None:
    """How many times one call of fn made the host wait for the GPU (torch's sync debug mode: .item(), a
    non_blocking=False copy to the host, nonzero, ...); None off a GPU."""
    import warnings

    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def write_results(out: str | Path, name: str, table: str, rows: list[dict], meta: dict, kind: str = "cpu") -> None:
    """The Markdown table to <out>/<name>_<kind>.md (kind: cpu or cuda) and the rows appended to <out>/<name>.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_{kind}.md").write_text(table + "\n")
    meta = {**meta, "torch": torch.__version__, "roli": roli.__version__}
    fields = list(meta) + list(dict.fromkeys(k for r in rows for k in r))
    path = out / f"{name}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}})


class AutocastModel(torch.nn.Module):
    """The peer's bf16: the model's forward under bf16 autocast (float32 logits out), as a user would wrap a
    model for torchattacks, which has no precision option of its own."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


def reference_pgd(model, x, y, eps, alpha, steps, zero_grad=None):
    """The attack as the RoLI reference code writes it (with its weaknesses: parameter gradients in the
    attack, a batch-level best iterate)."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).detach()
    best_loss, best_x = -float("inf"), x_adv
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (zero_grad or model.zero_grad)()
        loss.backward()  # every parameter gradient that is enabled, at every attack step
        with torch.no_grad():
            if loss.item() > best_loss:  # batch-level "best iterate"
                best_loss, best_x = loss.item(), x_adv.detach().clone()
            x_adv = x_adv + alpha * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1).detach()
    F.cross_entropy(model(x_adv), y)  # the extra forward with a graph
    (zero_grad or model.zero_grad)()
    return best_x


def matmul_peak(dtype, reps: int = 8, device: torch.device | str = "cpu") -> float:
    """Best median GFLOP/s of square matmuls (1024, 2048; on a GPU also 8192): the machine is shared, take
    its best moment."""
    best = 0.0
    cuda = torch.device(device).type == "cuda"
    sizes = (1024, 2048, 8192) if cuda else (1024, 2048)
    previous = torch.backends.cuda.matmul.allow_tf32
    if cuda and dtype == torch.float32:  # the fp32 peak of the arithmetic cuDNN's convolutions run (tf32_note)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
            t = round_robin({"mm": lambda a=a, b=b: a @ b}, reps, device=device)["mm"]
            best = max(best, 2 * n**3 / t / 1e9)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return best


def matmul_load(dtype, device: torch.device | str = "cpu", n: int | None = None, reps: int = 3):
    """(function, FLOPs): `reps` square matmuls of size n, to time as one more variant of a round-robin, so
    that the peak it gives was measured under the same machine load as the variants it is compared with.
    n defaults to 2048 on a CPU and 8192 on a GPU (a 2048 matmul leaves an H100/H200 far from its bf16 peak).
    On a GPU the fp32 matmul runs with the TF32 setting cuDNN's convolutions use (see tf32_note), so fp32
    utilisation is measured against the peak of the arithmetic the convolutions actually run."""
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def run():
        previous = torch.backends.cuda.matmul.allow_tf32
        if cuda and dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        try:
            for _ in range(reps):
                a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return run, 2 * n**3 * reps


def tf32_note(device: torch.device | str = "cpu") -> str:
    """How fp32 runs on this device, for the tables' headers."""
    if torch.device(device).type != "cuda":
        return "fp32 is IEEE fp32"
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    return (
        f"TF32: cuDNN convolutions {'on' if conv else 'off'}, matmuls {'on' if mm else 'off'} (the fp32 peak "
        f"matmul runs with the convolutions' setting)"
    )


def header(title: str, device: str, stamp: str, peaks: dict) -> str:
    shown = " / ".join(f"{p} {v:.0f}" for p, v in peaks.items())
    note = f"; {tf32_note('cuda')}" if torch.cuda.is_available() and "CPU" not in device else ""
    peak = f"; same-run matmul peak {shown} GFLOP/s" if peaks else ""
    return f"{title} on {device}, {stamp}; torch {torch.__version__}{peak}{note}"


def publish(
    out,
    name: str,
    title: str,
    peaks: dict,
    cols: list[str],
    cells,
    rows: list[dict],
    device: torch.device | str = "cpu",
) -> str:
    """Print the Markdown table (header with date, machine, versions, peaks) and write it with the CSV."""
    import datetime as dt

    kind = torch.device(device).type
    stamp, device = dt.datetime.now().strftime("%Y-%m-%d %H:%M"), device_name(device)
    lines = [header(title, device, stamp, peaks), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    write_results(out, name, table, rows, {"date": stamp, "device": device}, kind)
    return table
