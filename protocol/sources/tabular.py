"""Tabular sources as text (Adult, CSV; the label logic image_csv shares): a row becomes
``"col: value. col: value."`` (:func:`serialise_row`), the binary label is read from a column
(:func:`binary_label`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataError, Dataset, log

__all__ = ["NEGATIVE_LABELS_DESCRIPTION", "attribute_column", "binary_label", "check_negative_labels", "read_csv",
           "serialise_row", "tabular"]


NEGATIVE_LABELS_DESCRIPTION = (
    "values of label_column taken as negative (compared as stripped text). Without it the column "
    "may hold at most two distinct values, positive_label and one other (the negative); with it, "
    "a value that is neither positive_label nor listed is an error. Rows are filtered by "
    "include/exclude first")


def check_negative_labels(positive: str, negatives: list[str] | None) -> list[str] | None:
    """``negatives`` stripped; an empty list or one that holds ``positive`` is refused."""
    if negatives is None:
        return None
    negatives = [str(v).strip() for v in negatives]
    if not negatives:
        raise ValueError("negative_labels lists no values (leave it out for a two-valued label column)")
    if positive.strip() in negatives:
        raise ValueError(f"negative_labels holds positive_label {positive!r}")
    return negatives


def serialise_row(values: dict[str, object], columns: list[str]) -> str:
    """Serialise one record as ``"col: value. col: value."`` in ``columns`` order.

    Missing values (None/NaN) become ``unknown``; numbers that are integral print without ``.0``.
    """
    parts = []
    for c in columns:
        v = values.get(c)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            v = "unknown"
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        parts.append(f"{c}: {str(v).strip()}.")
    return " ".join(parts)


def read_csv(path: Path, **kw):
    import pandas as pd

    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        return pd.read_csv(path, **kw)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"cannot parse {path}: {err}") from None


def tabular(df, features: list[str], label: np.ndarray, sens_cols: list[str], desc: str,
             attr_col: str | None, attr_pos: str | None) -> Dataset:
    """Common tail of Adult/CSV loading: drop rows with missing label/sensitive, serialise."""
    import pandas as pd

    keep = ~pd.isna(label)
    for c in sens_cols:
        keep &= ~df[c].isna().to_numpy()
    n_drop = int((~keep).sum())
    if n_drop:
        log.warning("%s: dropped %d row(s) with a missing label or sensitive value", desc, n_drop)
    df = df.loc[keep].reset_index(drop=True)
    y = label[keep].astype(np.int64)
    records = df[features].to_dict(orient="records")
    texts = [serialise_row(r, features) for r in records]
    s = None
    if sens_cols:
        s = df[sens_cols].astype(str).agg("|".join, axis=1).to_numpy()
    attr = attribute_column(df, attr_col, attr_pos, desc)
    return Dataset("text", texts, y, s, attr, n_skipped=n_drop, description=desc)


def attribute_column(df, column: str | None, positive: str | None, desc: str) -> np.ndarray | None:
    """(N,) int64 bias-injection attribute: ``column == positive`` (default: the larger of its
    two values), or None without a column.

    Raises:
        DataError: the column is absent, or not binary and no ``positive`` is given.
    """
    if column is None:
        return None
    if column not in df.columns:
        raise DataError(f"{desc}: bias-injection attribute column {column!r} not found")
    col = df[column].astype(str).str.strip()
    if positive is None:
        vals = sorted(col.unique())
        if len(vals) != 2:
            raise DataError(f"{desc}: attribute {column!r} is not binary; set attribute_positive")
        positive = vals[1]
    return (col == positive).to_numpy().astype(np.int64)


def value_counts_text(values) -> str:
    """``'a' (3), 'b' (1)``: values with their row counts, most frequent first."""
    counts = values.value_counts()
    pairs = sorted(((str(v), int(n)) for v, n in counts.items()), key=lambda vn: (-vn[1], vn[0]))
    return ", ".join(f"{v!r} ({n})" for v, n in pairs)


def binary_label(column, cfg, path: Path) -> np.ndarray:
    """(N,) float: 1.0 where ``cfg.label_column`` equals ``cfg.positive_label``, 0.0 where it is
    negative, NaN where it is missing; values are compared as stripped text.

    Without ``cfg.negative_labels`` the column may hold at most two distinct values (the other
    one is negative); with it, every value must be ``positive_label`` or listed.

    Raises:
        DataError: a third value without ``negative_labels``, a value that is neither positive
            nor listed, or no row with ``positive_label``; naming the file, the column and the
            offending values with their counts.
    """
    name = cfg.label_column
    text = column.astype(str).str.strip().where(column.notna())
    present = text.dropna()
    distinct = set(present.unique())
    positive = cfg.positive_label
    negatives = getattr(cfg, "negative_labels", None)
    if negatives is not None:
        unexpected = present[~present.isin([positive, *negatives])]
        if len(unexpected):
            raise DataError(
                f"{path}: label column {name!r} has value(s) that are neither positive_label "
                f"{positive!r} nor in negative_labels {list(negatives)}: unexpected {value_counts_text(unexpected)}; "
                f"add them to negative_labels, or drop those rows with exclude = {{{name} = [...]}}")
    elif len(distinct) > 2:
        raise DataError(
            f"{path}: label column {name!r} has {len(distinct)} distinct values ({value_counts_text(present)}), "
            f"not two; positive_label {positive!r} is the positive class, so list the values that are "
            f"negative in negative_labels (any other value is then an error), or drop rows with "
            f"exclude = {{{name} = [...]}}")
    if positive not in distinct:
        held = value_counts_text(present) if len(present) else "no values (all missing)"
        raise DataError(f"{path}: no row has {name} == {positive!r}; label column {name!r} holds {held}")
    return np.where(text.isna(), np.nan, (text == positive).astype(float))
