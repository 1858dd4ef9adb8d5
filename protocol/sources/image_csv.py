"""``kind = "image_csv"``: a folder of images described by a metadata CSV (CelebA, CheXpert, ...)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..schema import FilePath
from .base import BiasInjection, DataError, Dataset, RowsAndGroups, decode_images, filtered, log, save_npz_atomic
from .tabular import NEGATIVE_LABELS_DESCRIPTION, attribute_column, binary_label, check_negative_labels, read_csv

__all__ = ["ImageCSVData", "load", "load_image_csv"]


class ImageCSVData(RowsAndGroups):
    """A folder of images described by a metadata CSV (CelebA, CheXpert, Fitzpatrick17k, ...).

    ``path`` is the CSV; ``image_column`` holds each image's path relative to the CSV's folder;
    ``label_column`` with ``positive_label`` defines the binary task (a column with more than
    two values needs ``negative_labels``); ``sensitive_columns`` (the auditor's only) define the
    groups, several crossed into ``"a|b"``. Rows with a missing label or sensitive value are
    dropped with a counted warning; a listed image that is missing or cannot be decoded is an
    error. Images are resized to the model's input size (bicubic) and the decoded array is
    cached like UTKFace's.
    """

    kind: Literal["image_csv"]
    path: FilePath
    image_column: str
    label_column: str
    positive_label: str
    negative_labels: list[str] | None = Field(None, description=NEGATIVE_LABELS_DESCRIPTION)
    sensitive_columns: list[str] = Field(default_factory=list)
    na_values: list[str] = Field(default_factory=lambda: ["", "NA", "NaN"])
    delimiter: str = ","

    @field_validator("negative_labels")
    @classmethod
    def _negatives(cls, v: list[str] | None, info) -> list[str] | None:
        return check_negative_labels(info.data.get("positive_label", ""), v)

    @model_validator(mode="after")
    def _distinct(self) -> "ImageCSVData":
        clash = {self.image_column, self.label_column} & set(self.sensitive_columns)
        if clash or self.image_column == self.label_column:
            raise ValueError("image_column, label_column and sensitive_columns must be distinct columns")
        return self


CONFIG = ImageCSVData


def load_image_csv(cfg, image_size: int, cache_dir: Path | None = None,
                   attribute: str | None = None, attribute_positive: str | None = None) -> Dataset:
    """Images listed in a metadata CSV (:class:`protocol.config.ImageCSVData`), resized to
    ``image_size``; the decoded array is cached as ``.npz`` in ``cache_dir`` (keyed by the CSV's
    folder, the file list and the size). ``attribute`` (bias injection only) names a column kept
    as the binary ``Dataset.attr``.

    Raises:
        DataError: the CSV is missing or unparsable, a named column is absent, an image is
            missing or undecodable, no row has the positive label, or a label value is neither
            positive nor negative (more than two values without ``negative_labels``, or one not
            listed in it; see :func:`binary_label`).
    """
    csv = Path(cfg.path)
    df = read_csv(csv, sep=cfg.delimiter, na_values=cfg.na_values, keep_default_na=False, dtype=str,
                   skipinitialspace=True)
    desc = f"image_csv({csv.name})"
    needed = [cfg.image_column, cfg.label_column, *cfg.sensitive_columns]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{csv}: column(s) not found: {missing}; columns are {list(df.columns)}")
    df = filtered(df, cfg, desc)
    label = binary_label(df[cfg.label_column], cfg, csv)
    keep = ~(np.isnan(label) | df[cfg.image_column].isna().to_numpy())
    for c in cfg.sensitive_columns:
        keep &= ~df[c].isna().to_numpy()
    n_drop = int((~keep).sum())
    if n_drop:
        log.warning("%s: dropped %d row(s) with a missing image, label or sensitive value", desc, n_drop)
    df = df.loc[keep].reset_index(drop=True)
    files = [(csv.parent / p.strip()) for p in df[cfg.image_column]]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DataError(f"{desc}: {len(absent)} listed image(s) not found, e.g. {absent[0]}")
    y = label[keep].astype(np.int64)
    if y.sum() == 0:
        raise DataError(f"{csv}: no row with {cfg.label_column} == {cfg.positive_label!r} is left after "
                        "dropping rows with a missing image or sensitive value")
    key = hashlib.sha256(("\n".join(str(f) for f in files) + f"|{csv.resolve()}|{image_size}").encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"image_csv-{key}.npz" if cache_dir else None
    images = None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                images = z["images"]
        except (OSError, ValueError, KeyError):
            log.warning("%s: cache %s unreadable; rebuilding", desc, cache)
    if images is None or len(images) != len(files):
        images = decode_images(files, image_size)
        if cache is not None:
            save_npz_atomic(cache, images=images)
    s = df[cfg.sensitive_columns].astype(str).agg("|".join, axis=1).to_numpy() if cfg.sensitive_columns else None
    attr = attribute_column(df, attribute, attribute_positive, desc)
    return Dataset("image", images, y, s, attr, n_skipped=n_drop, description=desc)


def load(cfg: ImageCSVData, image_size: int | None, cache_dir: Path | None,
         attribute: BiasInjection | None) -> Dataset:
    """:func:`load_image_csv` for an image model.

    Raises:
        DataError: no image model (``image_size`` None), or see :func:`load_image_csv`.
    """
    if image_size is None:
        raise DataError("image_csv needs an image model (model.kind = 'timm')")
    return load_image_csv(cfg, image_size, cache_dir, attribute.attribute if attribute else None,
                          attribute.attribute_positive if attribute else None)


def names_sensitive(cfg: ImageCSVData) -> bool:
    """Whether the config lists sensitive columns."""
    return bool(cfg.sensitive_columns)
