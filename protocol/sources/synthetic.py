"""``kind = "synthetic"``: the embedded default, images with a known spurious correlation (no files)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..schema import StrictModel
from .base import BiasInjection, DataError, Dataset

__all__ = ["SyntheticData", "load", "make_synthetic"]


class SyntheticData(StrictModel):
    """The embedded synthetic dataset (no files): see :func:`protocol.data.make_synthetic`.

    ``spurious_correlation`` is P(sensitive == label) in the generated data (0.5 = independent);
    ``task_signal`` is how often the true (stripe) feature shows the label; ``tint`` scales how
    strongly s shows in the images.
    ``sensitive`` names whether the loader keeps the generated attribute (only the auditor may).
    """

    kind: Literal["synthetic"]
    n: int = Field(2400, ge=50)
    image_size: int = Field(32, ge=8)
    spurious_correlation: float = Field(0.85, ge=0.0, le=1.0)
    task_signal: float = Field(0.8, ge=0.5, le=1.0)
    tint: float = Field(1.0, ge=0.0, description="strength of the sensitive colour tint (1 = the "
                        "default, strong; 0 = s invisible in the images)")
    seed: int = 1234
    sensitive: bool = False


CONFIG = SyntheticData


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


def load(cfg: SyntheticData, image_size: int | None, cache_dir: Path | None,
         attribute: BiasInjection | None) -> Dataset:
    """The generated data (its attribute kept only for bias injection on ``"synthetic"``).

    Raises:
        DataError: a bias-injection attribute other than ``"synthetic"``.
    """
    attr_name = attribute.attribute if attribute else None
    ds = make_synthetic(cfg, with_sensitive=cfg.sensitive)
    if attr_name not in (None, "synthetic"):
        raise DataError("the synthetic source's only attribute is 'synthetic'")
    if attr_name is None:
        ds.attr = None
    return ds


def names_sensitive(cfg: SyntheticData) -> bool:
    """Whether the config keeps the generated sensitive attribute."""
    return cfg.sensitive
