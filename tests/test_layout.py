"""The package's shape: no import cycle, every third-party import declared, each outcome word and each
stabilizer spelled in one module. Read from the source (ast), so an import inside a function counts."""
import ast
import dataclasses
import importlib.metadata
import os
import re
import sys
import tomllib

import pytest

from gopc import config as C
from gopc import outcome as O

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "gopc")


def modules() -> dict[str, str]:
    """gopc module name -> its file."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return found


def imports(path: str) -> set[str]:
    """Every module a file imports, at its top or inside a function: `from a import b` counts as a.b
    when that is a module of its own, else as a."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(path) if i in mods and i != m and i != "gopc"} for m, path in mods.items()}


def cycle_through(g: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in g[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_walk_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from gopc.sweep import settings\n    from gopc.train import train\n")
    assert {"gopc.sweep.settings", "gopc.train", "os"} <= imports(str(f))
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    g = graph()
    cycles = [c for m in sorted(g) if (c := cycle_through(g, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def declared() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_third_party_import_of_the_package_is_declared_in_pyproject():
    owners = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    tops = {name.split(".")[0] for path in modules().values() for name in imports(path)}
    third = sorted(t for t in tops if t != "gopc" and t not in sys.stdlib_module_names)
    assert {"torch", "ray", "optuna", "mlflow"} <= set(third)  # the walk found the obvious ones
    missing = [t for t in third
               if not {d.lower().replace("_", "-") for d in owners.get(t, [t])} & declared()]
    assert not missing, f"imported by gopc/ but not in pyproject.toml's dependencies: {missing}"


def quoted(word: str) -> list[str]:
    """`file:line` of every quoted spelling of `word` in gopc/ (as a string of its own)."""
    pattern = re.compile(rf"""(?<![\w.])["']{re.escape(word)}["']""")
    return [f"{os.path.relpath(path, ROOT)}:{n}" for path in modules().values()
            for n, line in enumerate(open(path), 1) if pattern.search(line)]


@pytest.mark.parametrize("word", O.ALL + (O.INTERRUPTED,))
def test_each_outcome_word_is_spelled_in_gopc_outcome_alone(word):
    assert {w.split(":")[0] for w in quoted(word)} == {"gopc/outcome.py"}, quoted(word)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(C.StabilizerConfig)])
def test_each_stabilizer_is_defined_in_config_and_never_named_in_a_string(name):
    """A stabilizer's field is defined in config.py (which models it applies to, as field metadata) and read
    as `.name` elsewhere; a quoted spelling of it (a hand-kept list of names) would be a second place."""
    assert quoted(name) == []
