"""Loading one party's parts of its data source (:func:`load_split`).

Both parties must turn a record into model input identically (the auditor evaluates the
developer's model on its own data), and in controlled studies both must cut the same source into
the same disjoint parts. The sources (one module per ``kind``) are in :mod:`protocol.sources`,
the cut and the bias injection in :mod:`protocol.partition`; which part a party loads, and
whether it keeps the sensitive attribute, is decided here.

Images are returned as ``uint8`` arrays of shape (N, H, W, 3) already resized to the model's input
size; texts as lists of strings; labels as ``int64`` (N,) in {0, 1}; sensitive groups as ``str``
(N,) or ``None`` when the party holds none.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ExperimentConfig
from .partition import SPLITS, Role, inject_bias, partition_indices
from .sources import BiasInjection, DataConfig, DataError, Dataset, load_source, merge_groups
from .sources.adult import load_adult
from .sources.base import row_filter
from .sources.csv import load_csv
from .sources.image_csv import load_image_csv
from .sources.synthetic import make_synthetic
from .sources.tabular import serialise_row
from .sources.utkface import UTK_RACES, load_utkface, parse_utkface_name

__all__ = [
    "SPLITS",
    "UTK_RACES",
    "DataError",
    "Dataset",
    "Role",
    "default_cache_dir",
    "inject_bias",
    "load_adult",
    "load_csv",
    "load_image_csv",
    "load_source",
    "load_split",
    "load_utkface",
    "make_synthetic",
    "merge_groups",
    "parse_utkface_name",
    "partition_indices",
    "row_filter",
    "serialise_row",
]


def default_cache_dir() -> Path:
    """Folder for decoded-image caches: ``$FAIRSPLIT_CACHE``, else ``$XDG_CACHE_HOME/fairsplit``,
    else ``~/.cache/fairsplit``. Each party's cache stays on its own machine."""
    env = os.environ.get("FAIRSPLIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fairsplit"


def load_split(cfg: DataConfig, exp: ExperimentConfig, role: Role, image_size: int | None,
               cache_dir: Path | None = None, bias: BiasInjection | None = None) -> dict[str, Dataset]:
    """Load one party's parts of its data source.

    Developer: ``{"developer_train": Dataset}`` with ``s`` = ``attr`` = None (bias injection, if
    configured, is applied first and the attribute then discarded). Auditor:
    ``{"auditor_train", "auditor_val", "auditor_test"}``, each with ``s``.

    Raises:
        DataError: a part is empty, or the source is unusable (see the loaders).
    """
    ds = load_source(cfg, image_size, cache_dir or default_cache_dir(),
                     bias if role == "developer" else None)
    parts = partition_indices(len(ds), exp.partition, role)
    out = {}
    for name, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"partition {name!r} is empty; check [experiment.partition] fractions")
        part = ds.subset(idx)
        if role == "developer":
            if bias is not None:
                part = part.subset(inject_bias(part.y, part.attr, bias.correlation, exp.partition.seed))
            part.s = None
            part.attr = None
        out[name] = part
    return out
