"""Fairness/utility benchmark: every method (and a λ grid) over seeds, with the co-located runner.

Writes into ``out``: one run folder per (method, λ, seed) with its ``results.json``,
``table.csv`` and ``table.md`` (mean ± std over seeds of the test metrics and wall time) and
``pareto.png`` (accuracy against demographic parity difference and against equalized odds
difference, one point per method and λ, ERM marked).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from protocol.config import RunFile

from .colocated import run_colocated

__all__ = ["DEFAULT_LAMS", "TABLE_METRICS", "run_fairness_bench", "summarise", "write_outputs"]

#: Default λ grid per method (ERM has none).
DEFAULT_LAMS = {"erm": [0.0], "unlearning": [0.5, 1.0], "adversarial": [0.1, 1.0],
                "orthogonality": [0.1, 1.0], "entropy": [0.1, 1.0]}
TABLE_METRICS = ("accuracy", "auc", "demographic_parity_difference", "equal_opportunity_difference",
                 "equalized_odds_difference", "false_positive_rate_ratio", "worst_group_accuracy")
SHORT = {"accuracy": "acc", "auc": "AUC", "demographic_parity_difference": "DPD",
         "equal_opportunity_difference": "EOpD", "equalized_odds_difference": "EOD",
         "false_positive_rate_ratio": "FPR ratio", "worst_group_accuracy": "WGA"}


def run_fairness_bench(run: RunFile, methods: list[str], seeds: int, out: Path,
                       lams: dict[str, list[float]] | None = None,
                       log: Callable[[str], None] = print) -> list[dict]:
    """Run each (method, λ, seed) co-located; return one row per run (test metrics + wall time).

    Runs whose ``results.json`` already exists in ``out`` are read back, not rerun, so an
    interrupted benchmark continues where it stopped.
    """
    lams = {**DEFAULT_LAMS, **(lams or {})}
    rows = []
    for method in methods:
        for lam in lams[method]:
            for seed in range(seeds):
                r = run.model_copy(deep=True)
                r.experiment.method.name = method
                r.experiment.method.lam = lam
                r.experiment.seed = seed
                folder = Path(out) / f"{method}-lam{lam:g}-seed{seed}"
                done = folder / "results.json"
                t0 = time.perf_counter()
                if done.exists():
                    res = json.loads(done.read_text())
                else:
                    res = run_colocated(r, folder)
                log(f"{method} λ={lam:g} seed={seed}: acc {res['metrics']['accuracy']:.4f} "
                    f"DPD {res['metrics']['demographic_parity_difference']:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
                rows.append({"method": method, "lam": lam, "seed": seed,
                             "wall_time_s": res["wall_time_s"],
                             **{k: res["metrics"].get(k) for k in TABLE_METRICS}})
    return rows


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (method, λ), in first-seen order."""
    keys = list(dict.fromkeys((r["method"], r["lam"]) for r in rows))
    out = []
    for method, lam in keys:
        group = [r for r in rows if r["method"] == method and r["lam"] == lam]
        entry = {"method": method, "lam": lam, "seeds": len(group)}
        for k in (*TABLE_METRICS, "wall_time_s"):
            entry[k], entry[f"{k}_std"] = _mean_std([g[k] for g in group])
        out.append(entry)
    return out


def write_outputs(rows: list[dict], out: Path, title: str = "") -> list[dict]:
    """Write table.csv, table.md and pareto.png into ``out``; returns the summary rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    header = "| method | λ | seeds | " + " | ".join(SHORT[k] for k in TABLE_METRICS) + " | wall time (s) |"
    lines = [f"### {title}" if title else "", "", header,
             "|" + " --- |" * (len(TABLE_METRICS) + 4)]
    for s in summary:
        cells = [f"{s[k]:.3f} ± {s[k + '_std']:.3f}" if math.isfinite(s[k]) else "n/a"
                 for k in TABLE_METRICS]
        lines.append(f"| {s['method']} | {s['lam']:g} | {s['seeds']} | " + " | ".join(cells)
                     + f" | {s['wall_time_s']:.0f} |")
    (out / "table.md").write_text("\n".join(lines).lstrip() + "\n")
    _pareto(summary, out / "pareto.png", title)
    return summary


def _pareto(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"erm": "black", "unlearning": "tab:blue", "adversarial": "tab:red",
              "orthogonality": "tab:green", "entropy": "tab:purple"}
    for ax, fair in zip(axes, ("demographic_parity_difference", "equalized_odds_difference")):
        for s in summary:
            erm = s["method"] == "erm"
            ax.errorbar(s[fair], s["accuracy"], xerr=s[fair + "_std"], yerr=s["accuracy_std"],
                        fmt="*" if erm else "o", ms=14 if erm else 7,
                        color=colors.get(s["method"], "gray"), capsize=2)
            ax.annotate(s["method"] if erm else f"{s['method']} λ={s['lam']:g}", (s[fair], s["accuracy"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(SHORT[fair] + " (lower is fairer)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "accuracy vs fairness")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
