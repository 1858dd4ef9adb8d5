"""Utility and group-fairness metrics for binary classification, as defined by fairlearn.

Every fairness number is computed with fairlearn's ``MetricFrame`` so that the definitions are
exactly fairlearn's (Bird et al., 2020, "Fairlearn: A toolkit for assessing and improving fairness
in AI"): a *difference* is max − min of the per-group metric, a *ratio* is min / max, and
``equalized_odds_difference`` is the worst case (max) of the TPR and FPR differences.

The report is what the auditor is allowed to send back: aggregate numbers over groups of at least
``min_group_size`` examples. Smaller groups are refused (:class:`SmallGroupError`), because a
metric over a handful of people can reveal individual attributes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equalized_odds_difference,
    false_positive_rate,
    false_positive_rate_difference,
    false_positive_rate_ratio,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

__all__ = ["METRIC_DEFINITIONS", "REPORT_KEYS", "PER_GROUP_KEYS", "SmallGroupError", "confusion_counts", "fairness_report",
           "report_from_counts"]

#: Scalar keys of :func:`fairness_report` (``per_group`` comes beside them).
REPORT_KEYS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "auc",
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equal_opportunity_difference",
    "equalized_odds_difference",
    "false_positive_rate_difference",
    "false_positive_rate_ratio",
    "worst_group_accuracy",
)
#: One-line definition of each reported metric (fairlearn's definitions; differences are
#: max − min over the sensitive groups, ratios min / max).
METRIC_DEFINITIONS = {
    "accuracy": "fraction of correct predictions",
    "balanced_accuracy": "mean of the true positive and true negative rates",
    "worst_group_accuracy": "lowest accuracy of any sensitive group",
    "demographic_parity_difference": "largest difference in selection rate (share predicted positive) between groups",
    "demographic_parity_ratio": "smallest over largest selection rate of the groups",
    "equalized_odds_difference": "the larger of the TPR difference and the FPR difference between groups",
    "equal_opportunity_difference": "largest difference in true positive rate between groups",
    "false_positive_rate_difference": "largest difference in false positive rate between groups",
    "false_positive_rate_ratio": "smallest over largest false positive rate of the groups",
}
#: Keys of each ``per_group`` entry.
PER_GROUP_KEYS = ("n", "accuracy", "selection_rate", "tpr", "fpr")


class SmallGroupError(ValueError):
    """A sensitive group has fewer examples than the configured minimum; nothing is reported."""


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def fairness_report(
    y_true: Any,
    y_score: Any,
    sensitive: Any,
    threshold: float = 0.5,
    min_group_size: int = 1,
) -> dict[str, Any]:
    """Accuracy, AUC and group-fairness metrics of a binary classifier.

    Args:
        y_true: shape (n,), labels in {0, 1}.
        y_score: shape (n,), score for the positive class in [0, 1] (e.g. softmax probability);
            the prediction is ``y_score >= threshold``.
        sensitive: shape (n,), group of each example (any hashable values; 2 or more groups).
        threshold: decision threshold on ``y_score``.
        min_group_size: groups with fewer examples are refused.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "auc", "demographic_parity_difference",
        "demographic_parity_ratio", "equal_opportunity_difference", "equalized_odds_difference",
        "false_positive_rate_difference", "false_positive_rate_ratio", "worst_group_accuracy",
        "per_group": {group: {"n", "accuracy", "selection_rate", "tpr", "fpr"}}}``.
        Differences are max − min over groups, ratios min / max (fairlearn). As in fairlearn and
        scikit-learn, the TPR of a group without positives (FPR without negatives) is 0.0; AUC
        with one class present and other non-finite values are ``None``.

    Raises:
        ValueError: mismatched lengths, empty input, labels outside {0, 1}, non-finite scores,
            fewer than two groups.
        SmallGroupError: a group has fewer than ``min_group_size`` examples.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    sensitive = np.asarray(sensitive)
    n = len(y_true)
    if not (y_true.ndim == y_score.ndim == sensitive.ndim == 1):
        raise ValueError(
            f"y_true, y_score and sensitive must be 1-D; got shapes {y_true.shape}, "
            f"{y_score.shape}, {sensitive.shape}"
        )
    if not (n == len(y_score) == len(sensitive)):
        raise ValueError(
            f"length mismatch: y_true {n}, y_score {len(y_score)}, sensitive {len(sensitive)}"
        )
    if n == 0:
        raise ValueError("cannot compute metrics on an empty set")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"y_true must be binary in {{0, 1}}; found {np.unique(y_true)[:10]}")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score contains NaN or infinite values")
    y_true = y_true.astype(np.int64)
    groups, sizes = np.unique(sensitive.astype(str), return_counts=True)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 sensitive groups, found {len(groups)}")
    small = [g for g, c in zip(groups, sizes) if c < min_group_size]
    if small:
        raise SmallGroupError(
            f"sensitive group(s) {small} have fewer than min_group_size={min_group_size} "
            "examples; refusing to report metrics over them"
        )
    sens = sensitive.astype(str)
    y_pred = (y_score >= threshold).astype(np.int64)

    with warnings.catch_warnings():
        # fairlearn/sklearn warn on groups without positives or negatives; such values become None.
        warnings.simplefilter("ignore")
        frame = MetricFrame(
            metrics={
                "n": count,
                "accuracy": accuracy_score,
                "selection_rate": selection_rate,
                "tpr": true_positive_rate,
                "fpr": false_positive_rate,
            },
            y_true=y_true,
            y_pred=y_pred,
            sensitive_features=sens,
        )
        auc = roc_auc_score(y_true, y_score) if len(np.unique(y_true)) == 2 else float("nan")
        report: dict[str, Any] = {
            "n": int(n),
            "accuracy": _finite_or_none(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": _finite_or_none(balanced_accuracy_score(y_true, y_pred)),
            "auc": _finite_or_none(auc),
            "demographic_parity_difference": _finite_or_none(
                demographic_parity_difference(y_true, y_pred, sensitive_features=sens)
            ),
            "demographic_parity_ratio": _finite_or_none(
                demographic_parity_ratio(y_true, y_pred, sensitive_features=sens)
            ),
            "equal_opportunity_difference": _finite_or_none(
                equal_opportunity_difference(y_true, y_pred, sensitive_features=sens)
            ),
            "equalized_odds_difference": _finite_or_none(
                equalized_odds_difference(y_true, y_pred, sensitive_features=sens)
            ),
            "false_positive_rate_difference": _finite_or_none(
                false_positive_rate_difference(y_true, y_pred, sensitive_features=sens)
            ),
            "false_positive_rate_ratio": _finite_or_none(
                false_positive_rate_ratio(y_true, y_pred, sensitive_features=sens)
            ),
            "worst_group_accuracy": _finite_or_none(frame.group_min()["accuracy"]),
        }
    by_group = frame.by_group
    report["per_group"] = {
        str(g): {
            "n": int(by_group.loc[g, "n"]),
            **{k: _finite_or_none(by_group.loc[g, k]) for k in PER_GROUP_KEYS if k != "n"},
        }
        for g in by_group.index
    }
    return report


def confusion_counts(y_true: Any, y_score: Any, sensitive: Any, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per-group confusion counts: group name → float64 array ``[tn, fp, fn, tp]`` (4,).

    Every example falls in exactly one cell of one group, so adding or removing one example
    changes the concatenated counts by 1 in L2 norm (the sensitivity of the noisy report).
    Non-finite scores count as negative predictions (no error, so no NaN oracle).
    """
    y_true = np.asarray(y_true).astype(np.int64)
    y_score = np.nan_to_num(np.asarray(y_score, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    y_pred = (y_score >= threshold).astype(np.int64)
    sens = np.asarray(sensitive).astype(str)
    out = {}
    for g in np.unique(sens):
        m = sens == g
        cell = 2 * y_true[m] + y_pred[m]  # 0 tn, 1 fp, 2 fn, 3 tp
        out[str(g)] = np.bincount(cell, minlength=4).astype(np.float64)
    return out


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def report_from_counts(counts: dict[str, Any], min_n: int = 1) -> dict[str, Any]:
    """The :func:`fairness_report` of per-group confusion counts (fairlearn's definitions).

    Args:
        counts: group → ``[tn, fp, fn, tp]`` (4,), possibly noisy reals; negative values are
            clipped to 0 (post-processing).
        min_n: floor of each published (rounded) ``n``.

    Returns:
        The same keys as :func:`fairness_report`; ``auc`` is ``None`` (it needs scores). With
        exact counts every other value equals :func:`fairness_report`'s: differences are max −
        min over groups, ratios min / max, a group's TPR without positives (FPR without
        negatives) is 0.0.

    Raises:
        ValueError: fewer than two groups, or a count vector that is not of length 4.
    """
    if len(counts) < 2:
        raise ValueError(f"need at least 2 sensitive groups, found {len(counts)}")
    c = {}
    for g, v in counts.items():
        v = np.clip(np.asarray(v, dtype=np.float64), 0.0, None)
        if v.shape != (4,):
            raise ValueError(f"counts of group {g!r} must be [tn, fp, fn, tp], got shape {v.shape}")
        c[str(g)] = v
    per_group = {}
    for g in sorted(c):
        tn, fp, fn, tp = c[g]
        n = tn + fp + fn + tp
        per_group[g] = {"n": max(int(round(n)), min_n, 1), "accuracy": _ratio(tn + tp, n),
                        "selection_rate": _ratio(fp + tp, n),
                        "tpr": _ratio(tp, tp + fn) if tp + fn > 0 else 0.0,
                        "fpr": _ratio(fp, fp + tn) if fp + tn > 0 else 0.0}
    tn, fp, fn, tp = np.sum(list(c.values()), axis=0)
    total = tn + fp + fn + tp
    # scikit-learn's balanced accuracy: the mean recall over the classes present
    recalls = [r for r, den in ((tp / (tp + fn) if tp + fn > 0 else None, tp + fn),
                                (tn / (tn + fp) if tn + fp > 0 else None, tn + fp)) if den > 0]

    def values(key):
        return [v[key] for v in per_group.values() if v[key] is not None]

    def diff(key):
        v = values(key)
        return float(max(v) - min(v)) if v else None

    def ratio(key):
        v = values(key)
        return (float(min(v) / max(v)) if max(v) > 0 else None) if v else None

    tpr_d, fpr_d = diff("tpr"), diff("fpr")
    accs = values("accuracy")
    return {
        "n": max(int(round(total)), min_n, 1),
        "accuracy": _ratio(tn + tp, total),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "auc": None,
        "demographic_parity_difference": diff("selection_rate"),
        "demographic_parity_ratio": ratio("selection_rate"),
        "equal_opportunity_difference": tpr_d,
        "equalized_odds_difference": None if tpr_d is None or fpr_d is None else max(tpr_d, fpr_d),
        "false_positive_rate_difference": fpr_d,
        "false_positive_rate_ratio": ratio("fpr"),
        "worst_group_accuracy": float(min(accs)) if accs else None,
        "per_group": per_group,
    }
