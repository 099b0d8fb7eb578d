"""The shape of the code, measured (issue 25): no function longer than 80 lines (docstrings and argument
parsers aside), and the trainer's whole TrainConfig taken by at most 6 functions: the rest build from the
small specs of roli.specs."""

from __future__ import annotations

import ast
from pathlib import Path

import roli

ROOT = Path(roli.__file__).resolve().parent
MAX_LINES = 80
PARSERS = {"build_parser"}  # one add_argument per option: long by nature


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def long_functions(source: str, where: str) -> list[str]:
    out = []
    for fn in _functions(ast.parse(source)):
        first = fn.body[0]
        value = getattr(first, "value", None)
        doc = first if isinstance(value, ast.Constant) and isinstance(value.value, str) else None
        lines = fn.end_lineno - fn.lineno + 1 - (doc.end_lineno - doc.lineno + 1 if doc else 0)
        if lines > MAX_LINES and fn.name not in PARSERS:
            out.append(f"{where}:{fn.lineno} {fn.name}: {lines} lines")
    return out


def takes_train_config(source: str, where: str) -> list[str]:
    out = []
    for fn in _functions(ast.parse(source)):
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        if any(a.annotation is not None and "TrainConfig" in ast.unparse(a.annotation) for a in args):
            out.append(f"{where}:{fn.lineno} {fn.name}")
    return out


def _sources():
    return [(str(p.relative_to(ROOT.parent)), p.read_text()) for p in sorted(ROOT.rglob("*.py"))]


def test_no_function_over_80_lines():
    found = [f for where, src in _sources() for f in long_functions(src, where)]
    assert not found, found


def test_train_config_taken_by_at_most_six_functions():
    found = [f for where, src in _sources() for f in takes_train_config(src, where)]
    assert len(found) <= 6, found


def test_the_measures_find_what_they_look_for():
    body = "\n".join(f"    x = {i}" for i in range(MAX_LINES + 1))
    assert long_functions(f'def f():\n    """doc"""\n{body}\n', "t") == ["t:1 f: 82 lines"]  # the def line counts
    assert long_functions(f"def build_parser():\n{body}\n", "t") == []
    assert takes_train_config("def g(cfg: TrainConfig, n: int): pass\ndef h(cfg): pass\n", "t") == ["t:1 g"]


def test_no_two_modules_share_a_file_name():
    """A name says what a file holds: one zoo.py, one alp.py, one _checks.py. The fused ops and their Triton
    kernels are the exception by design (ops/pgd_step.py dispatches to kernels/pgd_step.py)."""
    paired = {"__init__.py", "pgd_step.py", "keep_best.py"}
    seen: dict[str, list[str]] = {}
    for p in ROOT.rglob("*.py"):
        seen.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    shared = {name: where for name, where in seen.items() if len(where) > 1 and name not in paired}
    assert not shared, shared
    assert sorted(seen["pgd_step.py"]) == ["kernels/pgd_step.py", "ops/pgd_step.py"]


def unsafe_loads(source: str, where: str) -> list[str]:
    """Calls that could run code from a file: torch.load without weights_only=True, np.load with allow_pickle other
    than False, pickle.load(s)/Unpickler (roli's restricted unpickler aside), yaml.load outside config._yaml (whose
    loader is a SafeLoader), yaml.unsafe_load/full_load, eval, exec, marshal."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        bad = (
            (name == "torch.load" and kw.get("weights_only") != "True")
            or (name == "np.load" and kw.get("allow_pickle", "False") != "False")
            or name
            in (
                "pickle.load",
                "pickle.loads",
                "marshal.loads",
                "eval",
                "exec",
                "yaml.unsafe_load",
                "yaml.full_load",
                "yaml.load",
            )  # fmt: skip
        )
        if bad:
            out.append(f"{where}:{node.lineno} {ast.unparse(node)[:80]}")
    return out


def test_no_code_runs_from_a_file_roli_reads():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        found += unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    where = [(f.split(":")[0], f.split(" ", 1)[1]) for f in found]
    assert where == [("config.py", "yaml.load(text, Loader=UniqueKeys)")], found  # UniqueKeys is a SafeLoader
    assert unsafe_loads("torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\ntorch.load(p)\n", "x") == [
        "x:1 torch.load(p, weights_only=False)", "x:2 np.load(p, allow_pickle=True)", "x:3 torch.load(p)"]  # fmt: skip
    import yaml

    from roli.config import _yaml

    assert issubclass(_loader_of(_yaml), yaml.SafeLoader)


def _loader_of(fn):
    import yaml

    seen = []
    real = yaml.load

    def spy(text, Loader):  # noqa: N803 - yaml's own argument name
        seen.append(Loader)
        return real(text, Loader=Loader)

    yaml.load = spy
    try:
        fn("a: 1")
    finally:
        yaml.load = real
    return seen[0]
