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
