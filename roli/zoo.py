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
        f"  use            python -m roli.train --model {e.name} --checkpoint {e.filename} ...",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=prog("zoo"), description=__doc__.strip())
    p.add_argument("name", nargs="?", help="show one entry in full")
    args = p.parse_args(argv)
    if args.name is None:
        print(table())
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
