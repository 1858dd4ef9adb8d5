"""Data sources: one module per ``kind``, each holding its config model and its loader.

A source module defines ``CONFIG`` (its pydantic table, whose ``kind`` literal names it),
``load(cfg, image_size, cache_dir, attribute) -> Dataset`` and ``names_sensitive(cfg) -> bool``.
Every module of this package that defines ``CONFIG`` is a source (found on import, in name
order), so a new source is one new module: :data:`SOURCES` and the :data:`DataConfig` union are
built from them, and :func:`load_source` dispatches on ``kind``.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Annotated, Union

import numpy as np
from pydantic import Field

from .base import BiasInjection, DataError, Dataset, RowsAndGroups, log

__all__ = ["SOURCES", "BiasInjection", "DataConfig", "DataError", "Dataset", "RowsAndGroups", "load_source",
           "merge_groups", "names_sensitive"]


def _discover() -> dict[str, ModuleType]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        config = getattr(module, "CONFIG", None)
        if config is not None:
            found[config.model_fields["kind"].annotation.__args__[0]] = module
    return found


#: ``kind`` → the source's module (``CONFIG``, ``load``, ``names_sensitive``).
SOURCES: dict[str, ModuleType] = _discover()

#: The ``[developer.data]`` / ``[auditor.data]`` table: one of the sources, by ``kind``.
DataConfig = Annotated[Union[tuple(m.CONFIG for m in SOURCES.values())], Field(discriminator="kind")]


def names_sensitive(cfg) -> bool:
    """Whether a data config names (and so would load) sensitive attributes."""
    return bool(SOURCES[cfg.kind].names_sensitive(cfg))


def load_source(cfg, image_size: int | None, cache_dir: Path | None = None,
                attribute: BiasInjection | None = None) -> Dataset:
    """Load a whole data source as configured (sensitive groups only where the config names
    them), its groups renamed by ``group_map`` (:func:`merge_groups`).

    Raises:
        DataError: the source is unusable (see its loader), or an unknown ``kind``.
    """
    source = SOURCES.get(getattr(cfg, "kind", None))
    if source is None:
        raise DataError(f"unknown data source {cfg!r}")
    ds = source.load(cfg, image_size, cache_dir, attribute)
    return merge_groups(ds, getattr(cfg, "group_map", {}))


def merge_groups(ds: Dataset, group_map: dict[str, str]) -> Dataset:
    """``ds`` with its sensitive group names renamed by ``group_map`` (groups mapped to one name
    merge); unmapped names stay.

    Raises:
        DataError: ``group_map`` names a group the data does not have (a typo would otherwise
            silently merge nothing).
    """
    if not group_map or ds.s is None:
        return ds
    present = set(np.unique(np.asarray(ds.s).astype(str)))
    unknown = sorted(set(group_map) - present)
    if unknown:
        raise DataError(f"group_map names group(s) {unknown} that the data does not have; groups "
                        f"are {sorted(present)}")
    ds.s = np.array([group_map.get(str(v), str(v)) for v in ds.s])
    log.info("group_map: %d groups → %d", len(present), len(set(ds.s)))
    return ds
