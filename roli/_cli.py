"""Shared by the command lines (roli.evaluate, roli.train): one error type for bad values, the parser
that reports argparse errors in one line, and the parsers of budgets and KEY=VALUE options."""

from __future__ import annotations

import argparse
import math

# How the command lines were started: "python -m roli" (python -m roli.train, ...) or "roli" (the console
# command, roli/cli.py, sets it). Program names in usage lines and error messages follow it.
INVOKED_AS = "python -m roli"


def prog(command: str) -> str:
    """The program name as the user started it: "python -m roli.train" or "roli train"."""
    return f"roli {command}" if INVOKED_AS == "roli" else f"python -m roli.{command}"


class BadValue(ValueError):
    """A bad option value: reported as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors in one line (exit 2) and the module's whole docstring as the help's description
    (kept as written: its examples are laid out by hand)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_defaults(self, defaults: dict) -> None:
        """The defaults the help shows, by destination (values or words), where the help does not state one."""
        self._defaults_text = {**getattr(self, "_defaults_text", {}), **defaults}

    def format_help(self) -> str:
        """Every option's help says its default (a flag's: off; a value option's: add_defaults' or none), or that
        it is required."""
        known = getattr(self, "_defaults_text", {})
        for action in self._actions:
            text = action.help or ""
            if action.help == argparse.SUPPRESS or "default" in text or "required" in text or action.dest == "help":
                continue
            if not action.option_strings or action.required:
                note = "required"
            elif action.nargs == 0:  # a flag (store_true / store_false / store_const)
                note = "default: off"
            else:
                value = known.get(action.dest, action.default)
                empty = value is None or value is False or value == {} or value == []
                note = "default: none" if empty else f"default: {value}"
            action.help = f"{text} ({note})" if text else note
        return super().format_help()


def auto_device(value: str | None) -> str:
    """--device auto (the default of train and evaluate): cuda where a CUDA device is available, else cpu."""
    if value in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def parse_budget(value, name: str = "eps", norm: str | None = None) -> float:
    """8/255, "8/255", "0.5/255", 0.03 -> a finite float >= 0. With norm="linf" also <= 1: an Linf budget
    on images in [0, 1] (the one rule train and evaluate share)."""
    try:
        if isinstance(value, str):
            num, sep, den = value.strip().partition("/")
            out = float(num) / float(den) if sep else float(num)
        elif isinstance(value, bool):
            raise TypeError
        else:
            out = float(value)
    except (ValueError, ZeroDivisionError, TypeError, OverflowError):
        raise BadValue(f"{name}: {value!r} is not a number or a fraction like 8/255") from None
    if not math.isfinite(out) or out < 0:
        raise BadValue(f"{name}: must be a finite number >= 0; got {value}")
    if norm == "linf" and out > 1:
        raise BadValue(f"{name}: {out:g} is out of range for Linf on images in [0, 1] (use e.g. 8/255)")
    return out


def budget_text(eps: float) -> str:
    """A budget as people write it: 8/255 where it is a whole number of 255ths (to 1e-4 of one: a budget read back
    from 6 significant digits, like evaluate's sweep keys, is one too), else its shortest decimal."""
    k = eps * 255
    if 0 < eps <= 1 and abs(k - round(k)) < 1e-4:
        return f"{round(k)}/255"
    return f"{eps:g}"


def parse_kwargs(items: list[str] | None, flag: str = "--model-arg") -> dict:
    """["img_size=32", "pretrained=false"] -> {"img_size": 32, "pretrained": False} (int, float, bool, str)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadValue(f"{flag}: expected KEY=VALUE; got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def quiet_pipe(main, name: str = "") -> int:  # noqa: C901 - one handler per way a command ends
    """main()'s exit status, quiet when the output pipe closes early (`roli train --help | head`): the rest of
    the output goes to /dev/null and the status is a SIGPIPE'd process's, 141, with no traceback. `name`: the
    program's name in its messages (default: from main's module)."""
    import os
    import sys

    try:
        code = int(main() or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail
        return 141
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves its state and says so itself)
        print(
            f"{name or _name(main)}: interrupted (Ctrl-C); roli replaces its files whole, so none is half-written: run "
            "the same command again (a run: --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 130
    except OSError as e:
        said = os_error(e)
        if said is None:
            raise
        print(f"{name or _name(main)}: error: {said}", file=sys.stderr)
        return 2


def os_error(e: OSError) -> str | None:
    """What a command says, in one line, when a path it was given cannot be used (the file system refused it, not
    roli): a full disk, a name too long, no permission, a read-only file system, a file where a folder should be;
    None for any other error."""
    import errno

    name = str(e.filename or "")
    where = f" ({name if len(name) <= 160 else name[:80] + '...' + name[-60:]})" if name else ""
    return {
        errno.ENOSPC: f"disk full{where}: free space there and run the same command again",
        errno.ENAMETOOLONG: f"a name in a path is longer than the file system allows{where}: give a shorter one",
        errno.EACCES: f"permission denied{where}: give a path this user may read (and write, for outputs)",
        errno.EPERM: f"operation not permitted{where}: give a path this user may read (and write, for outputs)",
        errno.EROFS: f"read-only file system{where}: give an output path on a writable one",
        errno.ENOTDIR: f"a path goes through a file where a folder should be{where}: give another path",
    }.get(e.errno)


def _name(main) -> str:
    """The program's name for a one-line message: prog(its command), from main's module (roli.train: train)."""
    import sys

    module = getattr(main, "__module__", "") or ""
    if module == "__main__":  # python -m roli.<command>: the module's own name is in its spec
        module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", "") or ""
    return prog(module.rpartition(".")[2]) if module.startswith("roli.") and module != "roli.cli" else "roli"


def exit_with(main) -> None:
    """sys.exit(main()) for a `python -m roli.<command>` entry point, through quiet_pipe."""
    import sys

    sys.exit(quiet_pipe(main))
