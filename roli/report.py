"""`python -m roli.report RUN_DIR ...`: one table of every stage of every run, and a plot in the manner of
the paper's Figure 1.

    python -m roli.report runs/c10-full runs/c10-lora --out reports/cifar10

For each run (a directory written by `python -m roli.train`) and each stage in its results.json: test
clean, PGD and AutoAttack accuracy (when the run had --autoattack), the best validation epoch, epochs
trained, wall time and training images/s (from the stage's metrics.jsonl). Writes report.md, report.csv
and report.png (test clean against test robust accuracy, one point per stage; RoLI, RanLI, ALP and
linear probing told apart) into --out (default: the current directory).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

from roli._cli import BadValue, OneLineParser, parse_budget, prog
from roli._io import atomic_write, file_sha256, nearest_existing
from roli.rundir import stage_dir as stage_dir_of

COLUMNS = [
    "run",
    "stage",
    "kind",
    "method",
    "test clean",
    "test PGD",
    "test PGD (ref. scoring)",
    "AutoAttack",
    "test images",
    "best epoch",
    "epochs",
    "wall s",
    "images/s",
    "notes",
]


def _kind(label: str, stage_dir: str, cfg: dict) -> str:
    if stage_dir == "roli-ft" or label.startswith("RoLI-"):
        return "RoLI"
    if stage_dir == "ranli-ft" or (stage_dir == "ft" and cfg.get("init") == "random"):
        return "RanLI"
    return {"alp": "ALP", "lp": "LP", "pretrain": "pretrain"}.get(stage_dir, "FT")


def rows_of(run: Path, name: str | None = None) -> list[dict]:
    results_path, cfg_path = run / "results.json", run / "config.json"
    if not results_path.is_file() or not cfg_path.is_file():
        raise BadValue(f"{run} has no results.json and config.json: not a finished run of python -m roli.train")
    try:
        results, cfg = json.loads(results_path.read_text()), json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadValue(f"{run}: cannot read its results ({e})") from None
    if not isinstance(results, dict) or not isinstance(cfg, dict):
        raise BadValue(f"{run}: results.json and config.json must each hold a JSON object")
    rows = []
    for label, r in results.items():
        if not isinstance(r, dict) or not isinstance(r.get("test", {}), dict) or not isinstance(r.get("val", {}), dict):
            print(f"report: skipped {label!r} in {results_path}: not a stage record", file=sys.stderr)
            continue
        stage_dir = r.get("dir") or stage_dir_of(label)  # runs written before results.json named the folder
        test, val = r.get("test", {}), r.get("val", {})
        pgd = next((v for k, v in test.items() if k.startswith("pgd") and not k.endswith("_reference")), None)
        pgd_ref = next((v for k, v in test.items() if k.startswith("pgd") and k.endswith("_reference")), None)
        history = []
        metrics = run / stage_dir / "metrics.jsonl"
        if metrics.is_file():
            history = _metrics(metrics)
        seconds = sum(h.get("seconds", 0) for h in history)
        seen = sum(h.get("images_per_s", 0) * h.get("seconds", 0) for h in history)
        for key, value in (("clean", test.get("clean")), ("PGD", pgd), ("PGD reference scoring", pgd_ref),
                           ("AutoAttack", test.get("autoattack"))):  # fmt: skip
            _accuracy(value, f"{results_path}: {label} test {key}")
        method = cfg.get("peft") if stage_dir in ("roli-ft", "ranli-ft", "ft") else stage_dir
        autoattack, note = test.get("autoattack"), None
        if autoattack is None:  # a later `roli evaluate --run` with AutoAttack on the run's test set and budget
            autoattack, note = evaluated_autoattack(run / stage_dir, cfg)
        rows.append(
            {
                "run": name or run.name,
                "stage": label,
                "kind": _kind(label, stage_dir, cfg),
                "method": method,
                "test clean": test.get("clean"),
                "test PGD": pgd,
                "test PGD (ref. scoring)": pgd_ref,
                "AutoAttack": autoattack,
                "test images": _images(test),
                "best epoch": val.get("epoch"),
                "epochs": len(history) or None,
                "wall s": round(seconds, 1) if history else None,
                "images/s": round(seen / seconds, 1) if seconds else None,
                "notes": note,
            }
        )
    return rows


def _images(test: dict) -> str | None:
    """How many test images the figures are of: "10000", or "500 of 10000 (partial)" for a run with --n-ex."""
    n, of = test.get("n"), test.get("of")
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    return f"{n} of {of} (partial)" if isinstance(of, int) and n < of else str(n)


def _accuracy(value, where: str) -> None:
    """A figure of a results file is an accuracy (a number in [0, 1]) or absent; anything else is refused."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
    if not ok:
        raise BadValue(f"{where} is {value!r}, not an accuracy in [0, 1]: the file was edited or is damaged")


def evaluated_autoattack(stage_dir: Path, cfg: dict) -> tuple[float | None, str | None]:
    """(AutoAttack accuracy, note) of the newest evaluation in STAGE/evaluations/ (written by `evaluate --run`)
    that attacked the stage's present best.pt (by its sha256) on the whole test split at the run's budget and
    norm; (None, None) when there is none. The note marks one made on changed data (--allow-changed-data). A
    malformed evaluation, or one of another best.pt, is skipped with a line on stderr."""
    best, present = stage_dir / "best.pt", None  # hashed once, and only if an evaluation is a candidate
    for path in sorted((stage_dir / "evaluations").glob("*.json"), reverse=True):
        try:
            res = json.loads(path.read_text())
            args = res["config"]
            aa = [v for k, v in res["attacks"].items() if k.startswith("AutoAttack")]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            print(f"report: skipped {path}: not an evaluation of roli evaluate --run", file=sys.stderr)
            continue
        try:
            same = (
                args.get("split") == "test"
                and args.get("n_ex") is None
                and args.get("norm") == cfg.get("norm")
                and abs(parse_budget(args.get("eps")) - parse_budget(cfg.get("eps"))) < 1e-9
            )
        except BadValue:
            same = False
        if not (aa and same):
            continue
        evaluated = res.get("checkpoint", {}).get("sha256") if isinstance(res.get("checkpoint"), dict) else None
        if evaluated is not None and present is None and best.is_file():
            present = file_sha256(best)
        if evaluated is None or evaluated != present:
            why = "it does not name the best.pt it evaluated" if evaluated is None else "it evaluated another best.pt"
            print(f"report: skipped {path}: {why} (roli evaluate --run again)", file=sys.stderr)
            continue
        _accuracy(aa[0], f"{path}: AutoAttack")
        changed = args.get("changed_since_run")
        return float(aa[0]), ("AutoAttack on changed data: " + "; ".join(map(str, changed)) if changed else None)
    return None, None


def _metrics(path: Path) -> list[dict]:
    """The epochs of a stage's metrics.jsonl; a malformed line is skipped with a line on stderr."""
    out = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        numbers = isinstance(row, dict) and all(
            isinstance(row.get(k, 0), (int, float)) and not isinstance(row.get(k, 0), bool)
            and math.isfinite(row.get(k, 0)) and row.get(k, 0) >= 0
            for k in ("seconds", "images_per_s")
        )  # fmt: skip
        if numbers:
            out.append(row)
        else:
            print(f"report: skipped line {i} of {path}: not an epoch record of roli", file=sys.stderr)
    return out


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v <= 1:
        return f"{100 * v:.2f}%"
    return str(v)


def check_out(out: Path, runs: list[Path]) -> None:
    """--out never inside a run directory (its own files), and never over a report.md / report.csv / report.png
    that is not roli's report (an earlier roli's included: its table starts with the same columns)."""
    from roli._io import RUN_MARKER, owner

    inside = owner(out / "report.md")
    if inside is not None and (inside / RUN_MARKER).is_file():
        raise BadValue(f"--out: {out} lies inside the run directory {inside}; give a folder outside any run")
    for run in runs:
        if out.resolve() == run.resolve():
            raise BadValue(f"--out: {out} is the run {run}; give a folder outside any run")
    heads = {"report.md": "| run | stage | kind | method |", "report.csv": "run,stage,kind,method,"}
    for name, head in heads.items():
        path = out / name
        if path.is_symlink() or path.exists() and not _starts_with(path, head):
            raise BadValue(
                f"--out: {path} exists and is not a roli report; roli replaces only its own reports: give another --out"
            )
    png = out / "report.png"
    if png.is_symlink() or png.exists() and not (out / "report.csv").is_file():
        raise BadValue(f"--out: {png} exists beside no roli report.csv: not roli's; give another --out")


def _starts_with(path: Path, head: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(len(head)) == head
    except OSError:
        return False


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                _cell(r[c]) if c.startswith(("test", "Auto")) else ("-" if r[c] is None else str(r[c])) for c in COLUMNS
            )
            + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    style = {
        "RoLI": ("tab:red", "o"),
        "RanLI": ("tab:blue", "s"),
        "ALP": ("tab:green", "^"),
        "LP": ("gray", "v"),
        "FT": ("tab:purple", "D"),
        "pretrain": ("black", "x"),
    }
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=130)
    fig.subplots_adjust(left=0.08, right=0.62)
    seen, key = set(), []
    for r in rows:
        robust = r["AutoAttack"] if r["AutoAttack"] is not None else r["test PGD"]
        if r["test clean"] is None or robust is None:
            continue
        color, marker = style.get(r["kind"], ("gray", "."))
        ax.scatter(
            100 * r["test clean"],
            100 * robust,
            c=color,
            marker=marker,
            s=60,
            label=r["kind"] if r["kind"] not in seen else None,
        )
        seen.add(r["kind"])
        key.append(f"{len(key) + 1}  {r['run']}: {r['stage']}")  # numbered points, names in the key beside the plot
        ax.annotate(str(len(key)), (100 * r["test clean"], 100 * robust), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("test clean accuracy (%)")
    ax.set_ylabel("test robust accuracy (%)")
    ax.set_title("clean vs robust accuracy per stage\n(robust: AutoAttack where the run had it, else PGD)", fontsize=9)
    ax.grid(alpha=0.3)
    if seen:  # a report without a robust figure plots nothing
        ax.legend(fontsize=8)
    shown = key if len(key) <= 40 else [*key[:39], f"... and {len(key) - 39} more (report.md)"]
    fig.text(0.64, 0.95, "\n".join(line[:60] for line in shown), fontsize=6.5, va="top", family="monospace")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=prog("report"), description=__doc__.strip())
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of python -m roli.train")
    p.add_argument("--out", default=".", help="where report.md, report.csv and report.png go (default: here)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="RUN_DIR=NAME",
        help="name a run's rows NAME instead of its folder's name (repeatable; roli grid names its runs so)",
    )
    args = p.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise BadValue(f"--out: {out} is a file; give a directory")
        base = nearest_existing(out)
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            what = "read-only" if base.is_dir() else "a file"
            raise BadValue(f"--out: cannot create {out}: {base} is {what}; give a writable directory")
        check_out(out, [Path(r) for r in args.runs])
        labels = {}
        for item in args.label:
            where, sep, name = item.rpartition("=")
            if not sep or not where or not name:
                raise BadValue(f"--label: expected RUN_DIR=NAME; got {item!r}")
            labels[os.path.normpath(where)] = name
        rows = [row for run in args.runs for row in rows_of(Path(run), labels.get(os.path.normpath(run)))]
    except BadValue as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(table + "\n"))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(out / "report.csv", write_csv)
    drawn = plot(rows, out / "report.png")
    print(
        f"written: {out / 'report.md'}, {out / 'report.csv'}"
        + (f", {out / 'report.png'}" if drawn else " (no matplotlib: no plot)")
    )
    return 0


if __name__ == "__main__":
    from roli._cli import exit_with

    exit_with(main)
