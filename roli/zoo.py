"""`python -m roli.zoo`: the registry of published robust backbones (name, architecture, threat model,
preprocessing, source), and where roli looks for each file.

    python -m roli.zoo              # the table
    python -m roli.zoo ares_swin_b  # one entry in full
"""

from __future__ import annotations

import sys

from roli._cli import OneLineParser, prog
from roli.models.registry import LAYOUTS, REGISTRY, cached_path, lookup, table


def describe(name: str) -> str:
    e = lookup(name)
    if e is None:
        raise KeyError(name)
    path = cached_path(e)
    lines = [
        f"{e.name}" + (f" (also: {', '.join(e.aliases)})" if e.aliases else ""),
        f"  architecture   {e.arch}" + (f" {e.arch_args}" if e.arch_args else ""),
        f"  threat model   {e.threat}, eps {e.eps_text}, ImageNet-1k",
        f"  preprocessing  {e.preprocessing()}",
        f"  source         {e.publisher}: {e.reported}",
        f"  file           {e.filename} from {e.url}" + (f" (sha256 {e.sha256})" if e.sha256 else ""),
        f"  cached at      {path} ({'present' if path.is_file() else 'absent'})",
        f"  layout         {e.layout}: {LAYOUTS[e.layout]}",
        f"  use            {prog('train')} --model {e.name} --checkpoint {e.filename} ...",
    ]
    return "\n".join(lines)


def compact(width: int = 100) -> str:
    """The registry as a plain table that fits `width` columns: name, architecture, threat model, publisher, and
    whether its file is in the cache (`roli zoo NAME` has the rest)."""
    rows = [("name", "architecture", "threat", "publisher", "file")]
    for e in REGISTRY.values():
        arch = e.arch.rpartition(":")[2]  # a factory's function name
        rows.append((e.name, arch, f"{e.threat} {e.eps_text}", e.publisher.split(" (")[0].split(" ")[0],
                     "cached" if cached_path(e).is_file() else "-"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * min(width, max(len(line) for line in lines)))
    return "\n".join(line[:width] for line in lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=prog("zoo"), description=__doc__.strip())
    p.add_argument("name", nargs="?", help="show one entry in full (default: the table of all)")
    p.add_argument("--markdown", action="store_true", help="the table in Markdown, every column in full")
    args = p.parse_args(argv)
    if args.name is None:
        print(table() if args.markdown else compact())
        print(f"\n{len(REGISTRY)} entries. Any name works as --model (train and evaluate) and in create_classifier.")
        return 0
    try:
        print(describe(args.name))
    except KeyError:
        print(f"{p.prog}: error: {args.name!r} is not in the registry ({prog('zoo')} lists it)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from roli._cli import exit_with

    exit_with(main)
