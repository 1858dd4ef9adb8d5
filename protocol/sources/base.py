"""What every data source shares: the loaded :class:`Dataset`, :class:`DataError`, row filters
and group merging (:class:`RowsAndGroups`), the bias-injection attribute (:class:`BiasInjection`),
and decoded-image caching.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from ..fileio import atomic_write_stream
from ..schema import StrictModel

__all__ = ["BiasInjection", "DataError", "Dataset", "RowsAndGroups", "decode_images", "filtered", "row_filter",
           "save_npz_atomic"]

log = logging.getLogger("fairsplit.protocol.data")


class DataError(ValueError):
    """A data source is missing, unreadable or malformed; the message names the file or column."""


@dataclass
class Dataset:
    """One party's view of (part of) a data source.

    Attributes:
        modality: ``"image"`` or ``"text"``.
        inputs: images ``uint8`` (N, H, W, 3), or a list of N strings.
        y: ``int64`` (N,) task labels in {0, 1}.
        s: ``str`` (N,) sensitive group per example, or ``None`` (developer).
        attr: binary attribute kept only for bias injection, discarded before training.
        n_skipped: malformed records skipped while loading.
    """

    modality: str
    inputs: np.ndarray | list[str]
    y: np.ndarray
    s: np.ndarray | None = None
    attr: np.ndarray | None = None
    n_skipped: int = 0
    description: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> "Dataset":
        """The examples at ``idx`` (int array), same modality, no copy of unselected rows."""
        idx = np.asarray(idx, dtype=np.int64)
        inputs = self.inputs[idx] if isinstance(self.inputs, np.ndarray) else [self.inputs[i] for i in idx]
        return Dataset(
            modality=self.modality,
            inputs=inputs,
            y=self.y[idx],
            s=None if self.s is None else self.s[idx],
            attr=None if self.attr is None else self.attr[idx],
            n_skipped=self.n_skipped,
            description=self.description,
            meta=dict(self.meta),
        )


class RowsAndGroups(StrictModel):
    """Row filters and group merging shared by the file-backed data sources.

    ``include`` keeps only the rows whose column has one of the listed values (every listed
    column must match), e.g. ``include = {race = ["African-American", "Caucasian"]}``;
    ``exclude`` drops the rows whose column has one of the listed values. Both apply to the whole
    source before it is partitioned, on either party (a party's filter reads the column even if
    it is not one of its features). Values are compared as text, stripped. ``group_map`` (the
    auditor's only) renames sensitive groups, merging several into one, e.g.
    ``group_map = {"Asian" = "Other", "Native American" = "Other"}``; unmapped groups keep their
    names. Unknown columns are errors that list the source's columns.
    """

    include: dict[str, list[str]] = Field(default_factory=dict)
    exclude: dict[str, list[str]] = Field(default_factory=dict)
    group_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("include", "exclude")
    @classmethod
    def _non_empty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = [c for c, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"column(s) {empty} list no values")
        return {c: [str(x).strip() for x in vals] for c, vals in v.items()}


class BiasInjection(StrictModel):
    """Controlled-study bias injection on the developer's training split.

    The developer's split is subsampled so that the agreement rate P(label == attribute) equals
    ``correlation`` (0.5: independent; 1.0: label fully predicted by the attribute). ``attribute``
    is a binary attribute of the source (``race_binary``/``gender`` for UTKFace, ``sex`` for
    Adult, ``synthetic`` for the synthetic data, or a CSV column with ``attribute_positive``).
    The attribute is read only to subsample and then discarded: it is not part of the
    developer's data afterwards.
    """

    attribute: str
    correlation: float = Field(ge=0.0, le=1.0)
    attribute_positive: str | None = None


def row_filter(columns: dict[str, np.ndarray], include: dict[str, list[str]],
               exclude: dict[str, list[str]], desc: str) -> np.ndarray:
    """(N,) bool mask of the rows ``include`` keeps and ``exclude`` does not drop.

    ``columns``: column name → (N,) values, compared as stripped text.

    Raises:
        DataError: a filter names a column the source does not have (the message lists them),
            or no row is left.
    """
    unknown = sorted((set(include) | set(exclude)) - set(columns))
    if unknown:
        raise DataError(f"{desc}: include/exclude name unknown column(s) {unknown}; columns are "
                        f"{sorted(columns)}")
    n = len(next(iter(columns.values()))) if columns else 0
    keep = np.ones(n, dtype=bool)
    for col, vals in include.items():
        keep &= np.isin(np.char.strip(np.asarray(columns[col]).astype(str)), vals)
    for col, vals in exclude.items():
        keep &= ~np.isin(np.char.strip(np.asarray(columns[col]).astype(str)), vals)
    if (include or exclude) and not keep.any():
        raise DataError(f"{desc}: include/exclude leave no row")
    if include or exclude:
        log.info("%s: include/exclude keep %d of %d rows", desc, int(keep.sum()), n)
    return keep


def filtered(df, cfg, desc: str):
    """``df`` with :func:`row_filter` of the config's ``include`` / ``exclude`` applied."""
    if not (cfg.include or cfg.exclude):
        return df
    keep = row_filter({c: df[c].astype(str).to_numpy() for c in df.columns}, cfg.include, cfg.exclude, desc)
    return df.loc[keep].reset_index(drop=True)


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` of ``arrays`` streamed to ``path`` through
    :func:`protocol.fileio.atomic_write_stream` (fsynced temp file, one rename): a crash leaves no
    torn cache, and the archive is never held in memory whole."""
    atomic_write_stream(path, lambda fh: np.savez(fh, **arrays))


def decode_images(files: list[Path], size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                out[i] = np.asarray(im)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot decode image {f}: {err}") from None
    return out
