"""Party isolation is the architecture: check it on the import graph of the source files."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTIES = ("developer", "auditor", "protocol", "deploy")
FORBIDDEN = {
    "developer": {"auditor", "deploy", "fairsplit"},
    "auditor": {"developer", "deploy", "fairsplit"},
    "protocol": {"developer", "auditor", "deploy", "fairsplit"},
}


def imported_roots(path: Path) -> set[str]:
    """The project parts a source file imports: ``fairsplit.<part>`` as ``<part>``, the public
    API (``fairsplit`` itself, which spans both parties) as ``fairsplit``, anything else by its
    top-level name (a bare ``auditor`` too: the pre-namespace name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules += [node.module] if node.module != "fairsplit" else [f"fairsplit.{a.name}" for a in node.names]
    roots = set()
    for name in modules:
        parts = name.split(".")
        if parts[0] == "fairsplit":
            roots.add(parts[1] if len(parts) > 1 and parts[1] in PARTIES else "fairsplit")
        else:
            roots.add(parts[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_the_other_party(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_checker_sees_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import fairsplit.auditor.service\nfrom fairsplit.developer import loop\n"
                 "from fairsplit import run_colocated\nimport protocol\nfrom . import sibling\n")
    assert imported_roots(f) == {"auditor", "developer", "fairsplit", "protocol"}


def test_installed_under_one_name():
    """Installed, the parties are subpackages of ``fairsplit``, and the bare names are not
    importable from it (they would collide with the registry's ``protocol`` and ``deploy``).
    Checked in a fresh interpreter outside the checkout (a checkout's root on ``sys.path``
    would show its folders)."""
    import subprocess
    import sys

    code = ("import importlib.util as u, json; "
            "print(json.dumps({n: getattr(u.find_spec(n), 'origin', None) for n in "
            f"{('fairsplit.protocol.config',) + PARTIES!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    origins = json.loads(out.stdout)
    assert origins.pop("fairsplit.protocol.config").endswith("protocol/config.py")
    assert not [n for n, o in origins.items() if o and o.startswith(str(ROOT))]


def test_importing_one_party_loads_nothing_of_the_other():
    """The public API at ``fairsplit`` is lazy: importing the developer's side in a fresh
    interpreter loads no module of the auditor's side."""
    import subprocess
    import sys

    code = ("import sys, fairsplit.developer.loop; "
            "print(sorted(m for m in sys.modules if m.startswith(('fairsplit.auditor', 'fairsplit.deploy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def module_graph() -> dict[str, set[str]]:
    """``fairsplit.<part>.<module>`` → the project modules it imports, every import counted
    (function-level and ``TYPE_CHECKING`` ones too; a package means its ``__init__``)."""
    mods = {}
    for part in PARTIES:
        for f in (ROOT / part).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            mods[".".join(["fairsplit", *(parts[:-1] if parts[-1] == "__init__" else parts)])] = f

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                edges |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names}
        graph[mod] = edges - {None, mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    """No cycle among the project's modules, counting imports under ``TYPE_CHECKING`` and inside
    functions (a cycle there is one design knot, whatever the interpreter tolerates)."""
    assert cycles(module_graph()) == []


def test_cycle_checker_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "fairsplit.auditor.gate" in module_graph()["fairsplit.auditor.service"]


def test_no_module_over_400_lines():
    """One idea per file: no module of the parties or of protocol/ over 400 lines."""
    long = {str(f.relative_to(ROOT)): n for part in ("developer", "auditor", "protocol")
            for f in (ROOT / part).rglob("*.py") if (n := len(f.read_text().splitlines())) > 400}
    assert long == {}


def test_every_subpackage_is_installed():
    """``pyproject.toml`` lists every package folder under its dotted name (a wheel installs
    only the listed ones; an editable install would hide a missing one)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fairsplit"} | {".".join(["fairsplit", *f.parent.relative_to(ROOT).parts])
                             for part in PARTIES for f in (ROOT / part).rglob("__init__.py")}
    assert found == listed
