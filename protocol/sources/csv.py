"""``kind = "csv"``: any CSV file, rows serialised as text."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import FilePath
from .base import BiasInjection, DataError, Dataset, RowsAndGroups, filtered
from .tabular import NEGATIVE_LABELS_DESCRIPTION, binary_label, check_negative_labels, read_csv, tabular

__all__ = ["CSVData", "load", "load_csv"]


class CSVData(RowsAndGroups):
    """Any CSV file, rows serialised as text ``"col: value. col: value."``.

    ``label_column`` with ``positive_label`` defines the binary task (a column with more than
    two values needs ``negative_labels``); ``feature_columns`` (in order) form the text;
    ``sensitive_columns`` (only the auditor's) define the groups, several columns are crossed
    into intersectional groups ``"a|b"``. ``na_values`` mark missing values, serialised as
    ``"unknown"`` in text; rows with a missing label or sensitive value are dropped with a
    counted warning.
    """

    kind: Literal["csv"]
    path: FilePath
    label_column: str
    positive_label: str
    negative_labels: list[str] | None = Field(None, description=NEGATIVE_LABELS_DESCRIPTION)
    feature_columns: list[str] = Field(min_length=1)
    sensitive_columns: list[str] = Field(default_factory=list)
    na_values: list[str] = Field(default_factory=lambda: ["?", "", "NA", "NaN"])
    delimiter: str = ","

    @field_validator("negative_labels")
    @classmethod
    def _negatives(cls, v: list[str] | None, info) -> list[str] | None:
        return check_negative_labels(info.data.get("positive_label", ""), v)

    @model_validator(mode="after")
    def _disjoint(self) -> "CSVData":
        overlap = set(self.feature_columns) & (set(self.sensitive_columns) | {self.label_column})
        if overlap:
            raise ValueError(f"feature_columns overlap label/sensitive columns: {sorted(overlap)}")
        return self


CONFIG = CSVData


def load_csv(cfg: CSVData, attribute: str | None = None, attribute_positive: str | None = None) -> Dataset:
    """Any CSV as text, per :class:`protocol.config.CSVData`.

    The label column must hold ``positive_label`` and at most one other value, or, with
    ``negative_labels``, only ``positive_label`` and the listed values (see :func:`binary_label`).

    Raises:
        DataError: file missing or unparsable, a named column absent, no positive labels, or a
            label value that is neither positive nor negative (more than two values without
            ``negative_labels``, or one not listed in it); naming the file, column and values.
    """
    df = read_csv(Path(cfg.path), sep=cfg.delimiter, na_values=cfg.na_values,
                   keep_default_na=False, dtype=str, skipinitialspace=True)
    needed = [cfg.label_column, *cfg.feature_columns, *cfg.sensitive_columns]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{cfg.path}: column(s) not found: {missing}; columns are {list(df.columns)}")
    df = filtered(df, cfg, f"CSV({cfg.path})")
    label = binary_label(df[cfg.label_column], cfg, Path(cfg.path))
    ds = tabular(df, cfg.feature_columns, label, cfg.sensitive_columns, f"CSV({cfg.path})",
                  attribute, attribute_positive)
    if ds.y.sum() == 0:
        raise DataError(f"{cfg.path}: no row with {cfg.label_column} == {cfg.positive_label!r} is left "
                        "after dropping rows with a missing sensitive value")
    return ds


def load(cfg: CSVData, image_size: int | None, cache_dir: Path | None,
         attribute: BiasInjection | None) -> Dataset:
    """:func:`load_csv` (a bias-injection attribute is a column, ``attribute_positive`` its positive value)."""
    return load_csv(cfg, attribute.attribute if attribute else None,
                    attribute.attribute_positive if attribute else None)


def names_sensitive(cfg: CSVData) -> bool:
    """Whether the config lists sensitive columns."""
    return bool(cfg.sensitive_columns)
