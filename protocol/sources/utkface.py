"""``kind = "utkface"``: UTKFace crops, labels parsed from the file names."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..schema import FilePath
from .base import BiasInjection, DataError, Dataset, RowsAndGroups, decode_images, log, row_filter, save_npz_atomic

__all__ = ["UTK_COLUMNS", "UTK_RACES", "UTKFaceData", "load", "load_utkface", "parse_utkface_name"]

UTKTarget = Literal["gender", "race", "race_binary", "age_bucket"]


#: Columns of a UTKFace row for include/exclude (from its file name): age in years, gender
#: (``male``/``female``), race (``White``, ``Black``, ``Asian``, ``Indian``, ``Others``).
UTK_COLUMNS = ("age", "gender", "race")


class UTKFaceData(RowsAndGroups):
    """UTKFace crops; labels parsed from ``[age]_[gender]_[race]_[datetime].jpg.chip.jpg``.

    ``task`` and ``sensitive`` choose among gender (0 male, 1 female), race (5 groups),
    race_binary (0 White, 1 non-White) and age_bucket (bucket index by ``age_bins`` edges, years).
    A binary task is required for the fairness metrics; ``age_bucket`` as task needs 2 buckets.
    """

    kind: Literal["utkface"]
    root: FilePath
    task: UTKTarget = "gender"
    sensitive: UTKTarget | None = None
    age_bins: list[int] = Field(default_factory=lambda: [0, 30, 200])

    @model_validator(mode="after")
    def _known_columns(self) -> "UTKFaceData":
        unknown = sorted((set(self.include) | set(self.exclude)) - set(UTK_COLUMNS))
        if unknown:
            raise ValueError(f"unknown UTKFace column(s) {unknown} in include/exclude; columns are "
                             f"{list(UTK_COLUMNS)}")
        return self

    @field_validator("age_bins")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if len(v) < 3 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("age_bins must be at least 3 strictly increasing edges (years)")
        return v


CONFIG = UTKFaceData


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """Parse ``[age]_[gender]_[race]_[datetime].jpg.chip.jpg`` into (age, gender, race).

    Returns ``None`` for a malformed name (missing field, non-integer, out-of-range value).
    Ranges: age 0–116 years, gender 0 (male) / 1 (female), race 0–4 (White, Black, Asian,
    Indian, Others).
    """
    parts = name.split("_")
    if len(parts) < 4:
        return None
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if not (0 <= age <= 116 and gender in (0, 1) and 0 <= race <= 4):
        return None
    return age, gender, race


UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")


def utk_target(kind: str, age: np.ndarray, gender: np.ndarray, race: np.ndarray,
                bins: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(integer codes, group names) for a UTKFace target."""
    if kind == "gender":
        return gender, np.array(["male", "female"])[gender]
    if kind == "race":
        return race, np.array(UTK_RACES)[race]
    if kind == "race_binary":
        code = (race != 0).astype(np.int64)
        return code, np.array(["White", "non-White"])[code]
    if kind == "age_bucket":
        code = np.clip(np.digitize(age, bins[1:-1]), 0, len(bins) - 2)
        names = np.array([f"{a}-{b - 1}" for a, b in zip(bins, bins[1:])])
        return code, names[code]
    raise DataError(f"unknown UTKFace target {kind!r}")


def load_utkface(cfg: UTKFaceData, image_size: int, cache_dir: Path | None = None,
                 attribute: str | None = None) -> Dataset:
    """Load UTKFace crops resized to ``image_size`` (bicubic), labels from file names.

    Malformed names (e.g. missing race field) are skipped with one warning giving their count.
    Decoded images are cached as ``.npz`` in ``cache_dir`` (keyed by folder, file list and size).
    ``attribute`` (bias injection only) names a binary target kept in ``Dataset.attr``.

    Raises:
        DataError: the folder is missing, has no valid images, or an image cannot be decoded.
    """
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"UTKFace folder not found: {root}")
    names = sorted(p.name for p in root.iterdir() if p.name.lower().endswith(".jpg"))
    parsed, files, skipped = [], [], []
    for nm in names:
        lab = parse_utkface_name(nm)
        if lab is None:
            skipped.append(nm)
            continue
        parsed.append(lab)
        files.append(root / nm)
    if skipped:
        log.warning("UTKFace: skipped %d file(s) with malformed names (e.g. %s)", len(skipped), skipped[0])
    if not files:
        raise DataError(f"no UTKFace images with valid names in {root}")
    lab = np.array(parsed, dtype=np.int64)
    if cfg.include or cfg.exclude:
        keep = row_filter({"age": lab[:, 0], "gender": np.array(["male", "female"])[lab[:, 1]],
                           "race": np.array(UTK_RACES)[lab[:, 2]]}, cfg.include, cfg.exclude,
                          f"UTKFace({root.name})")
        lab, files = lab[keep], [f for f, k in zip(files, keep) if k]
    age, gender, race = lab[:, 0], lab[:, 1], lab[:, 2]

    key = hashlib.sha256(("\n".join(f.name for f in files) + f"|{root.resolve()}|{image_size}").encode()).hexdigest()[:16]
    images = None
    cache = Path(cache_dir) / f"utkface-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                images = z["images"]
        except (OSError, ValueError, KeyError):
            log.warning("UTKFace cache %s unreadable; rebuilding", cache)
            images = None
    if images is None:
        images = decode_images(files, image_size)
        if cache is not None:
            save_npz_atomic(cache, images=images)

    y, _ = utk_target(cfg.task, age, gender, race, cfg.age_bins)
    if y.max() > 1:
        raise DataError(f"UTKFace task {cfg.task!r} is not binary; use gender, race_binary or 2 age_bins")
    s = None
    if cfg.sensitive is not None:
        _, s = utk_target(cfg.sensitive, age, gender, race, cfg.age_bins)
    attr = None
    if attribute is not None:
        attr, _ = utk_target(attribute, age, gender, race, cfg.age_bins)
        if attr.max() > 1:
            raise DataError(f"bias-injection attribute {attribute!r} must be binary")
    return Dataset("image", images, y.astype(np.int64), s, attr, n_skipped=len(skipped),
                   description=f"UTKFace({root.name}, task={cfg.task}, sensitive={cfg.sensitive})")


def load(cfg: UTKFaceData, image_size: int | None, cache_dir: Path | None,
         attribute: BiasInjection | None) -> Dataset:
    """:func:`load_utkface` for an image model.

    Raises:
        DataError: no image model (``image_size`` None), or see :func:`load_utkface`.
    """
    if image_size is None:
        raise DataError("UTKFace needs an image model (model.kind = 'timm')")
    return load_utkface(cfg, image_size, cache_dir, attribute.attribute if attribute else None)


def names_sensitive(cfg: UTKFaceData) -> bool:
    """Whether the config names a sensitive target."""
    return cfg.sensitive is not None
