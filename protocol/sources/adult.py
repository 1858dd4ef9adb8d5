"""``kind = "adult"``: UCI Adult, rows serialised as text; task ``income > 50K``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..schema import FilePath
from .base import BiasInjection, DataError, Dataset, RowsAndGroups, filtered
from .tabular import read_csv, tabular

__all__ = ["ADULT_COLUMNS", "AdultData", "load", "load_adult"]


ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
    "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
    "hours-per-week", "native-country", "income",
]


class AdultData(RowsAndGroups):
    """UCI Adult (``adult.data`` + optionally ``adult.test``), rows serialised as text.

    Task: ``income`` is ``>50K``. ``sensitive`` lists the sensitive columns this party holds
    (the developer must list none; they are then absent from its view). ``drop_columns`` are
    excluded from the text (``fnlwgt`` is a census sampling weight, not a person's feature).
    """

    kind: Literal["adult"]
    root: FilePath
    sensitive: list[Literal["sex", "race"]] = Field(default_factory=list)
    drop_columns: list[str] = Field(default_factory=lambda: ["fnlwgt"])
    include_test_file: bool = True


CONFIG = AdultData


ADULT_ATTR_POSITIVE = {"sex": "Female", "race": "White"}


def load_adult(cfg: AdultData, attribute: str | None = None) -> Dataset:
    """UCI Adult as text. Label: income ``>50K`` (test file labels end with ``.``, stripped).

    Raises:
        DataError: files missing or malformed, or a row has a label outside {<=50K, >50K}.
    """
    import pandas as pd

    root = Path(cfg.root)
    frames = [read_csv(root / "adult.data", header=None, names=ADULT_COLUMNS,
                        skipinitialspace=True, na_values=["?"])]
    if cfg.include_test_file:
        frames.append(read_csv(root / "adult.test", header=None, names=ADULT_COLUMNS,
                                skipinitialspace=True, na_values=["?"], skiprows=1))
    df = pd.concat(frames, ignore_index=True)
    df = df.dropna(how="all").reset_index(drop=True)
    df = filtered(df, cfg, f"Adult({root})")
    inc = df["income"].astype(str).str.strip().str.rstrip(".")
    bad = ~inc.isin([">50K", "<=50K"])
    if bad.any():
        raise DataError(f"Adult: {int(bad.sum())} row(s) with malformed income label, e.g. {inc[bad].iloc[0]!r}")
    label = (inc == ">50K").to_numpy().astype(np.float64)
    excluded = {"income", "sex", "race", *cfg.drop_columns}
    features = [c for c in ADULT_COLUMNS if c not in excluded]
    attr_pos = ADULT_ATTR_POSITIVE.get(attribute) if attribute else None
    return tabular(df, features, label, list(cfg.sensitive), f"Adult({root})", attribute, attr_pos)


def load(cfg: AdultData, image_size: int | None, cache_dir: Path | None,
         attribute: BiasInjection | None) -> Dataset:
    """:func:`load_adult` (the bias-injection attribute ``sex`` or ``race``)."""
    return load_adult(cfg, attribute.attribute if attribute else None)


def names_sensitive(cfg: AdultData) -> bool:
    """Whether the config lists sensitive columns."""
    return bool(cfg.sensitive)
