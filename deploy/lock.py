"""Print the installed versions of fairsplit's dependency closure as pip constraints.

``python -m fairsplit.deploy.lock > constraints.txt`` after a deliberate upgrade (install without
``-c``, run the suite and the benchmarks): the file README's install and ``.ci/run`` use, so that a
fresh machine resolves the versions the docs' numbers were measured with.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# The versions fairsplit's docs and tests were measured with (Python 3.11, Linux x86-64, the
# registry's plain 'pip install torch torchvision' build). README's install and .ci/run use it:
#   pip install -e ".[dev]" -c constraints.txt
# Update deliberately: install without -c, run the suite and the benchmarks, then regenerate
# with 'python -m fairsplit.deploy.lock > constraints.txt' (the closure of fairsplit[dev])."""


def closure(root: str = "fairsplit", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """Installed ``{canonical name: version}`` of every distribution ``root[extras]`` requires,
    transitively, under this interpreter's environment markers (``root`` itself excluded).

    Raises:
        metadata.PackageNotFoundError: ``root`` is not installed.
    """
    metadata.distribution(root)
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    done: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in done:
            continue
        done.add((canonicalize_name(name), wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here: nothing to pin
        found[canonicalize_name(name)] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or ("",))):
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    found.pop(canonicalize_name(root), None)
    return found


def main() -> None:
    """Write the constraints file's text to stdout."""
    pins = closure()
    sys.stdout.write(HEADER + "\n" + "".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))


if __name__ == "__main__":
    main()
