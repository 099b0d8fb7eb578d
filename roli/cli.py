"""`roli`: the console command. `roli train|evaluate|zoo|report|info ...` runs the same command line as
`python -m roli.train|evaluate|...` (which stays): the same parser, options and exit codes."""

from __future__ import annotations

import importlib
import sys

from roli import _cli

# command -> (module, one line for `roli --help`)
COMMANDS = {
    "train": ("roli.train", "train: the RoLI pipeline (pretrain, lp, alp, ft, roli); no options: the built-in demo"),
    "evaluate": ("roli.evaluate", "clean, PGD, eps-sweep and AutoAttack accuracy of a model or of a run"),
    "grid": ("roli.grid", "many configs as one grid: each distinct ALP stage once, locally or on SLURM"),
    "report": ("roli.report", "table, CSV and clean-vs-robust plot over finished runs"),
    "zoo": ("roli.zoo", "the published robust backbones roli knows (--model NAME)"),
    "info": ("roli.info", "versions, and which kernel backends are available"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: roli COMMAND [options]    (roli COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:{width}s}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The console command (and `python -m roli`): quiet, exit status 141, when its output pipe closes early."""
    args = sys.argv[1:] if argv is None else list(argv)
    return _cli.quiet_pipe(lambda: _main(argv), f"roli {args[0]}" if args and args[0] in COMMANDS else "roli")


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        import roli

        print(f"roli {roli.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"roli: error: {command!r} is not a command (one of {', '.join(COMMANDS)}; roli --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    before, _cli.INVOKED_AS = _cli.INVOKED_AS, "roli"
    try:
        return int(module.main(rest) or 0)
    finally:
        _cli.INVOKED_AS = before  # a caller in the same process (a test) sees the default again


if __name__ == "__main__":
    sys.exit(main())
