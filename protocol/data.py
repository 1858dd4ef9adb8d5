"""Data formats both parties agree on: sources, text serialisation, partitioning, bias injection.

Both parties must turn a record into model input identically (the auditor evaluates the
developer's model on its own data), and in controlled studies both must cut the same source into
the same disjoint parts. That agreement lives here; which part a party loads, and whether it keeps
the sensitive attribute, is decided by :func:`load_split`.

Images are returned as ``uint8`` arrays of shape (N, H, W, 3) already resized to the model's input
size; texts as lists of strings; labels as ``int64`` (N,) in {0, 1}; sensitive groups as ``str``
(N,) or ``None`` when the party holds none.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .config import (
    ADULT_COLUMNS,
    AdultData,
    BiasInjection,
    CSVData,
    DataConfig,
    ExperimentConfig,
    ImageCSVData,
    PartitionConfig,
    SyntheticData,
    UTKFaceData,
)
from .fileio import atomic_write_bytes

__all__ = [
    "DataError",
    "Dataset",
    "inject_bias",
    "default_cache_dir",
    "load_image_csv",
    "load_source",
    "load_split",
    "make_synthetic",
    "merge_groups",
    "parse_utkface_name",
    "partition_indices",
    "row_filter",
    "serialise_row",
]

log = logging.getLogger(__name__)

Role = Literal["developer", "auditor"]
SPLITS = ("developer_train", "auditor_train", "auditor_val", "auditor_test")


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


# --------------------------------------------------------------------------------------------
# Synthetic (embedded default)
# --------------------------------------------------------------------------------------------


def make_synthetic(cfg: SyntheticData, with_sensitive: bool = True) -> Dataset:
    """Deterministic synthetic images with a known spurious correlation (no files).

    Each 3×S×S image is Gaussian noise with two features added:

    * the task label y (balanced) as faint stripes (amplitude 0.12), vertical for z=1 and
      horizontal for z=0, where z equals y with probability ``cfg.task_signal``: a true but
      imperfect signal;
    * a binary sensitive attribute s as a strong colour tint (red for s=1, blue for s=0; scaled
      by ``cfg.tint``), with P(s == y) = ``cfg.spurious_correlation``: the easy shortcut.

    A fairness-unaware model learns the tint, so its positive rate differs by group (visible
    demographic parity difference). Returns ``uint8`` images (n, S, S, 3).
    """
    rng = np.random.default_rng(cfg.seed)
    n, size = cfg.n, cfg.image_size
    y = rng.integers(0, 2, n)
    agree = rng.random(n) < cfg.spurious_correlation
    s = np.where(agree, y, 1 - y)
    coords = np.arange(size)
    stripes_h = np.sin(coords * (2 * np.pi / 4))[:, None] * np.ones((1, size))
    stripes_v = stripes_h.T
    base = rng.normal(0.5, 0.22, size=(n, size, size, 3))
    z = np.where(rng.random(n) < cfg.task_signal, y, 1 - y)
    pattern = np.where(z[:, None, None] == 1, stripes_v[None], stripes_h[None])
    img = base + 0.12 * pattern[..., None]
    if cfg.tint:
        img[..., 0] += cfg.tint * np.where(s == 1, 0.15, -0.05)[:, None, None]
        img[..., 2] += cfg.tint * np.where(s == 0, 0.15, -0.05)[:, None, None]
    img = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Dataset(
        modality="image",
        inputs=img,
        y=y.astype(np.int64),
        s=np.array(["group_a", "group_b"])[s] if with_sensitive else None,
        attr=s.astype(np.int64),
        description=f"synthetic(n={n}, spurious_correlation={cfg.spurious_correlation})",
    )


# --------------------------------------------------------------------------------------------
# UTKFace
# --------------------------------------------------------------------------------------------


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


def _utk_target(kind: str, age: np.ndarray, gender: np.ndarray, race: np.ndarray,
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


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` of ``arrays`` to ``path`` through :func:`protocol.fileio.atomic_write_bytes`
    (fsynced temp file, one rename): a crash leaves no torn cache."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _decode_images(files: list[Path], size: int) -> np.ndarray:
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
        images = _decode_images(files, image_size)
        if cache is not None:
            _atomic_save_npz(cache, images=images)

    y, _ = _utk_target(cfg.task, age, gender, race, cfg.age_bins)
    if y.max() > 1:
        raise DataError(f"UTKFace task {cfg.task!r} is not binary; use gender, race_binary or 2 age_bins")
    s = None
    if cfg.sensitive is not None:
        _, s = _utk_target(cfg.sensitive, age, gender, race, cfg.age_bins)
    attr = None
    if attribute is not None:
        attr, _ = _utk_target(attribute, age, gender, race, cfg.age_bins)
        if attr.max() > 1:
            raise DataError(f"bias-injection attribute {attribute!r} must be binary")
    return Dataset("image", images, y.astype(np.int64), s, attr, n_skipped=len(skipped),
                   description=f"UTKFace({root.name}, task={cfg.task}, sensitive={cfg.sensitive})")


# --------------------------------------------------------------------------------------------
# Tabular as text: Adult, generic CSV
# --------------------------------------------------------------------------------------------


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


def _read_csv(path: Path, **kw):
    import pandas as pd

    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        return pd.read_csv(path, **kw)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"cannot parse {path}: {err}") from None


def _tabular(df, features: list[str], label: np.ndarray, sens_cols: list[str], desc: str,
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
    attr = _attribute(df, attr_col, attr_pos, desc)
    return Dataset("text", texts, y, s, attr, n_skipped=n_drop, description=desc)


def _attribute(df, column: str | None, positive: str | None, desc: str) -> np.ndarray | None:
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


def _counts(values) -> str:
    """``'a' (3), 'b' (1)``: values with their row counts, most frequent first."""
    counts = values.value_counts()
    pairs = sorted(((str(v), int(n)) for v, n in counts.items()), key=lambda vn: (-vn[1], vn[0]))
    return ", ".join(f"{v!r} ({n})" for v, n in pairs)


def _binary_label(column, cfg, path: Path) -> np.ndarray:
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
                f"{positive!r} nor in negative_labels {list(negatives)}: unexpected {_counts(unexpected)}; "
                f"add them to negative_labels, or drop those rows with exclude = {{{name} = [...]}}")
    elif len(distinct) > 2:
        raise DataError(
            f"{path}: label column {name!r} has {len(distinct)} distinct values ({_counts(present)}), "
            f"not two; positive_label {positive!r} is the positive class, so list the values that are "
            f"negative in negative_labels (any other value is then an error), or drop rows with "
            f"exclude = {{{name} = [...]}}")
    if positive not in distinct:
        held = _counts(present) if len(present) else "no values (all missing)"
        raise DataError(f"{path}: no row has {name} == {positive!r}; label column {name!r} holds {held}")
    return np.where(text.isna(), np.nan, (text == positive).astype(float))


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
            listed in it; see :func:`_binary_label`).
    """
    csv = Path(cfg.path)
    df = _read_csv(csv, sep=cfg.delimiter, na_values=cfg.na_values, keep_default_na=False, dtype=str,
                   skipinitialspace=True)
    desc = f"image_csv({csv.name})"
    needed = [cfg.image_column, cfg.label_column, *cfg.sensitive_columns]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{csv}: column(s) not found: {missing}; columns are {list(df.columns)}")
    df = _filtered(df, cfg, desc)
    label = _binary_label(df[cfg.label_column], cfg, csv)
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
        images = _decode_images(files, image_size)
        if cache is not None:
            _atomic_save_npz(cache, images=images)
    s = df[cfg.sensitive_columns].astype(str).agg("|".join, axis=1).to_numpy() if cfg.sensitive_columns else None
    attr = _attribute(df, attribute, attribute_positive, desc)
    return Dataset("image", images, y, s, attr, n_skipped=n_drop, description=desc)


def _filtered(df, cfg, desc: str):
    """``df`` with :func:`row_filter` of the config's ``include`` / ``exclude`` applied."""
    if not (cfg.include or cfg.exclude):
        return df
    keep = row_filter({c: df[c].astype(str).to_numpy() for c in df.columns}, cfg.include, cfg.exclude, desc)
    return df.loc[keep].reset_index(drop=True)


ADULT_ATTR_POSITIVE = {"sex": "Female", "race": "White"}


def load_adult(cfg: AdultData, attribute: str | None = None) -> Dataset:
    """UCI Adult as text. Label: income ``>50K`` (test file labels end with ``.``, stripped).

    Raises:
        DataError: files missing or malformed, or a row has a label outside {<=50K, >50K}.
    """
    import pandas as pd

    root = Path(cfg.root)
    frames = [_read_csv(root / "adult.data", header=None, names=ADULT_COLUMNS,
                        skipinitialspace=True, na_values=["?"])]
    if cfg.include_test_file:
        frames.append(_read_csv(root / "adult.test", header=None, names=ADULT_COLUMNS,
                                skipinitialspace=True, na_values=["?"], skiprows=1))
    df = pd.concat(frames, ignore_index=True)
    df = df.dropna(how="all").reset_index(drop=True)
    df = _filtered(df, cfg, f"Adult({root})")
    inc = df["income"].astype(str).str.strip().str.rstrip(".")
    bad = ~inc.isin([">50K", "<=50K"])
    if bad.any():
        raise DataError(f"Adult: {int(bad.sum())} row(s) with malformed income label, e.g. {inc[bad].iloc[0]!r}")
    label = (inc == ">50K").to_numpy().astype(np.float64)
    excluded = {"income", "sex", "race", *cfg.drop_columns}
    features = [c for c in ADULT_COLUMNS if c not in excluded]
    attr_pos = ADULT_ATTR_POSITIVE.get(attribute) if attribute else None
    return _tabular(df, features, label, list(cfg.sensitive), f"Adult({root})", attribute, attr_pos)


def load_csv(cfg: CSVData, attribute: str | None = None, attribute_positive: str | None = None) -> Dataset:
    """Any CSV as text, per :class:`protocol.config.CSVData`.

    The label column must hold ``positive_label`` and at most one other value, or, with
    ``negative_labels``, only ``positive_label`` and the listed values (see :func:`_binary_label`).

    Raises:
        DataError: file missing or unparsable, a named column absent, no positive labels, or a
            label value that is neither positive nor negative (more than two values without
            ``negative_labels``, or one not listed in it); naming the file, column and values.
    """
    df = _read_csv(Path(cfg.path), sep=cfg.delimiter, na_values=cfg.na_values,
                   keep_default_na=False, dtype=str, skipinitialspace=True)
    needed = [cfg.label_column, *cfg.feature_columns, *cfg.sensitive_columns]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{cfg.path}: column(s) not found: {missing}; columns are {list(df.columns)}")
    df = _filtered(df, cfg, f"CSV({cfg.path})")
    label = _binary_label(df[cfg.label_column], cfg, Path(cfg.path))
    ds = _tabular(df, cfg.feature_columns, label, cfg.sensitive_columns, f"CSV({cfg.path})",
                  attribute, attribute_positive)
    if ds.y.sum() == 0:
        raise DataError(f"{cfg.path}: no row with {cfg.label_column} == {cfg.positive_label!r} is left "
                        "after dropping rows with a missing sensitive value")
    return ds


# --------------------------------------------------------------------------------------------
# Partitioning and bias injection
# --------------------------------------------------------------------------------------------


def partition_indices(n: int, cfg: PartitionConfig, role: Role) -> dict[str, np.ndarray]:
    """Deterministic disjoint parts of ``range(n)`` for one party.

    ``shared_source``: one permutation of ``range(n)`` by ``cfg.seed`` is cut, in order, into
    developer_train, auditor_train, auditor_val, auditor_test by the configured fractions; both
    parties compute the same cut, so the parts are disjoint across parties. ``own_data``: the
    developer takes all rows; the auditor cuts its rows in proportion to its three fractions.
    ``max_*`` caps are applied after cutting. Returns only the calling party's parts.
    """
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    fr = {s: getattr(cfg, s) for s in SPLITS}
    if cfg.mode == "own_data":
        if role == "developer":
            fr = {"developer_train": 1.0, "auditor_train": 0.0, "auditor_val": 0.0, "auditor_test": 0.0}
        else:
            tot = fr["auditor_train"] + fr["auditor_val"] + fr["auditor_test"]
            fr = {"developer_train": 0.0, **{s: fr[s] / tot for s in SPLITS[1:]}}
    bounds = np.floor(np.cumsum([0.0] + [fr[s] for s in SPLITS]) * n + 1e-9).astype(int)
    parts = {s: perm[bounds[i]:bounds[i + 1]] for i, s in enumerate(SPLITS)}
    for s in SPLITS:
        cap = getattr(cfg, f"max_{s}")
        if cap is not None:
            parts[s] = parts[s][:cap]
    mine = ("developer_train",) if role == "developer" else SPLITS[1:]
    return {s: np.sort(parts[s]) for s in mine}


def inject_bias(y: np.ndarray, attr: np.ndarray, correlation: float, seed: int) -> np.ndarray:
    """Indices of a subsample in which P(y == attr) equals ``correlation``.

    Keeps every example of the under-represented kind (label agrees / disagrees with the binary
    attribute) and subsamples the other kind uniformly at random by ``seed``. Returns sorted int
    indices into ``y``.

    Raises:
        DataError: ``y``/``attr`` not binary, or the target cannot be reached (no agreeing or no
            disagreeing examples when 0 < correlation < 1).
    """
    y = np.asarray(y)
    attr = np.asarray(attr)
    if not (np.isin(y, (0, 1)).all() and np.isin(attr, (0, 1)).all()):
        raise DataError("bias injection needs a binary label and a binary attribute")
    agree = np.flatnonzero(y == attr)
    disagree = np.flatnonzero(y != attr)
    rng = np.random.default_rng(seed)
    c = correlation
    if c >= 1.0:
        keep_a, keep_d = len(agree), 0
    elif c <= 0.0:
        keep_a, keep_d = 0, len(disagree)
    elif len(agree) == 0 or len(disagree) == 0:
        raise DataError("bias injection impossible: the label never (or always) equals the attribute")
    elif len(agree) / (len(agree) + len(disagree)) < c:
        keep_a, keep_d = len(agree), int(round(len(agree) * (1 - c) / c))
    else:
        keep_a, keep_d = int(round(len(disagree) * c / (1 - c))), len(disagree)
    idx = np.concatenate([rng.choice(agree, keep_a, replace=False),
                          rng.choice(disagree, min(keep_d, len(disagree)), replace=False)])
    return np.sort(idx)


def load_source(cfg: DataConfig, image_size: int | None, cache_dir: Path | None = None,
                attribute: BiasInjection | None = None) -> Dataset:
    """Load a whole data source as configured (sensitive groups only where the config names them)."""
    attr_name = attribute.attribute if attribute else None
    if isinstance(cfg, SyntheticData):
        ds = make_synthetic(cfg, with_sensitive=cfg.sensitive)
        if attr_name not in (None, "synthetic"):
            raise DataError("the synthetic source's only attribute is 'synthetic'")
        if attr_name is None:
            ds.attr = None
        return ds
    if isinstance(cfg, UTKFaceData):
        if image_size is None:
            raise DataError("UTKFace needs an image model (model.kind = 'timm')")
        ds = load_utkface(cfg, image_size, cache_dir, attr_name)
    elif isinstance(cfg, AdultData):
        ds = load_adult(cfg, attr_name)
    elif isinstance(cfg, CSVData):
        ds = load_csv(cfg, attr_name, attribute.attribute_positive if attribute else None)
    elif isinstance(cfg, ImageCSVData):
        if image_size is None:
            raise DataError("image_csv needs an image model (model.kind = 'timm')")
        ds = load_image_csv(cfg, image_size, cache_dir, attr_name,
                            attribute.attribute_positive if attribute else None)
    else:
        raise DataError(f"unknown data source {cfg!r}")
    return merge_groups(ds, cfg.group_map)


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
