"""How both parties cut a source into disjoint parts, and the controlled-study bias injection.

In controlled studies (``partition.mode = "shared_source"``) both parties hold the same source
and must cut it identically, so the parts are disjoint across parties; with ``own_data`` each
party cuts only its own rows. :func:`inject_bias` subsamples the developer's part to a chosen
label–attribute agreement.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .config import PartitionConfig
from .sources import DataError

__all__ = ["SPLITS", "Role", "inject_bias", "partition_indices"]

Role = Literal["developer", "auditor"]
SPLITS = ("developer_train", "auditor_train", "auditor_val", "auditor_test")


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
