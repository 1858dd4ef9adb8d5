"""Fairness/utility benchmark: every method over seeds, λ chosen on validation, co-located runner.

For each method with a λ grid (``--lams`` or the method table's default,
:data:`protocol.methods.METHODS`), every λ is run on seed 0 and one λ is chosen from the
auditor's **validation** reports of those runs (:func:`choose_lam`); the chosen λ is then run on
``seeds`` seeds and only those runs' test reports enter the tables. The test part is never looked
at to choose anything.

Writes into ``out``: one run folder per (method, λ, seed) with its ``results.json``;
``selection.md`` (the validation metrics of every λ tried and the choice); ``table.csv`` and
``table.md`` (mean ± std over seeds of the test metrics, then a summary against ERM: change in
DPD, EOD and accuracy, and the best method within 1 accuracy point); ``summary.json`` (one row per
method: ``dataset`` (config path), ``method``, ``lam``, ``seeds``, and for each report metric its
``mean`` and ``std`` over seeds); ``pareto.png`` (accuracy against DPD and against EOD).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fairsplit.deploy.config import RunFile
from fairsplit.protocol.methods import METHODS, method_spec

from .colocated import run_colocated

__all__ = ["DEFAULT_LAMS", "REPORT_METRICS", "TABLE_METRICS", "choose_lam", "run_fairness_bench",
           "summarise", "write_outputs"]

#: Default λ grid per method, from the method table (empty: no λ, or chosen by the auditor).
DEFAULT_LAMS = {name: list(spec.lams) for name, spec in METHODS.items()}
TABLE_METRICS = ("accuracy", "auc", "demographic_parity_difference", "equal_opportunity_difference",
                 "equalized_odds_difference", "false_positive_rate_ratio", "worst_group_accuracy")
#: Every scalar metric of a report (summary.json carries each).
REPORT_METRICS = ("accuracy", "balanced_accuracy", "auc", "demographic_parity_difference",
                  "demographic_parity_ratio", "equal_opportunity_difference", "equalized_odds_difference",
                  "false_positive_rate_difference", "false_positive_rate_ratio", "worst_group_accuracy")
SHORT = {"accuracy": "acc", "auc": "AUC", "demographic_parity_difference": "DPD",
         "equal_opportunity_difference": "EOpD", "equalized_odds_difference": "EOD",
         "false_positive_rate_ratio": "FPR ratio", "worst_group_accuracy": "WGA"}
#: Accuracy a chosen λ may lose against ERM on validation (and the summary's "within 1 point").
ACCURACY_TOLERANCE = 0.01


def _final_val(res: dict) -> dict:
    """The last validation report of a run (the model the run ends with, before the test)."""
    vals = [row["val"] for row in res["per_round"] if row.get("val")]
    if not vals:
        raise ValueError("run has no validation report")
    return vals[-1]


def choose_lam(candidates: list[tuple[float, dict]], reference: dict | None,
               tolerance: float = ACCURACY_TOLERANCE) -> float:
    """Choose λ from validation reports: the fairest λ that keeps accuracy.

    Args:
        candidates: (λ, validation report) per λ of the grid (one seed).
        reference: ERM's validation report on the same seed, or None.
    Returns:
        Among the λ whose validation accuracy is at least the reference's (ERM's, else the best
        candidate's) minus ``tolerance``, the one with the smallest mean of DPD and EOD relative
        to the reference's (absolute gaps without a reference); ties go to the smaller λ. If no
        λ keeps accuracy, the most accurate one.
    Raises:
        ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("no λ to choose from")
    base_acc = reference["accuracy"] if reference else max(r["accuracy"] for _, r in candidates)

    def gap(r: dict) -> float:
        dpd, eod = r["demographic_parity_difference"] or 0.0, r["equalized_odds_difference"] or 0.0
        if reference:
            rd = max(reference["demographic_parity_difference"] or 0.0, 1e-6)
            re = max(reference["equalized_odds_difference"] or 0.0, 1e-6)
            return (dpd / rd + eod / re) / 2
        return (dpd + eod) / 2

    ok = [(lam, r) for lam, r in candidates if r["accuracy"] >= base_acc - tolerance - 1e-12]
    if not ok:
        return max(candidates, key=lambda c: (c[1]["accuracy"], -c[0]))[0]
    return min(ok, key=lambda c: (gap(c[1]), c[0]))[0]


def _configure(run: RunFile, method: str, lam: float | None, seed: int) -> RunFile:
    r = run.model_copy(deep=True)
    r.experiment.method = run.bench.method_config(method, lam)
    r.experiment.seed = seed
    return r


def run_fairness_bench(run: RunFile, methods: list[str], seeds: int, out: Path,
                       lams: dict[str, list[float]] | None = None,
                       log: Callable[[str], None] = print,
                       progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Choose each method's λ on validation (seed 0), then run it on ``seeds`` seeds.

    Per-method settings come from the run file's ``[bench.methods.<name>]`` tables. Runs whose
    ``results.json`` already exists in ``out`` are read back, not rerun, so an interrupted
    benchmark continues where it stopped.

    Returns:
        One row per reported run: ``method``, ``lam``, ``seed``, ``wall_time_s``, every metric
        of :data:`REPORT_METRICS` (test part), and ``selection`` rows (``phase == "selection"``,
        validation metrics of each λ tried) before them.

    ``progress(done, total)`` is called before the first run and after each (the seed-0 run at
    the chosen λ is the selection's run, read back).

    Raises:
        ValueError: ``seeds`` < 1, or a λ for a method without one.
    """
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    grids = {**DEFAULT_LAMS, **(lams or {})}
    rows: list[dict] = []
    total = sum((len(grids.get(m) or []) if len(grids.get(m) or []) > 1 else 0) + seeds for m in methods)
    done_runs = [0]
    if progress is not None:
        progress(0, total)

    def one(method: str, lam: float | None, seed: int) -> dict:
        folder = Path(out) / f"{method}-lam{(lam or 0.0):g}-seed{seed}"
        done = folder / "results.json"
        t0 = time.perf_counter()
        res = json.loads(done.read_text()) if done.exists() else run_colocated(
            _configure(run, method, lam, seed), folder)
        log(f"{method} λ={(lam or 0.0):g} seed={seed}: acc {res['metrics']['accuracy']:.4f} "
            f"DPD {res['metrics']['demographic_parity_difference']:.4f} "
            f"EOD {res['metrics']['equalized_odds_difference']:.4f} ({time.perf_counter() - t0:.0f} s)")
        done_runs[0] += 1
        if progress is not None:
            progress(done_runs[0], total)
        return res

    erm_val = None
    order = sorted(methods, key=lambda m: m != "erm")  # ERM first: the reference for choosing λ
    chosen: dict[str, float | None] = {}
    for method in order:
        grid = [float(x) for x in grids.get(method) or []]
        if grid and "lam" not in method_spec(method).config.model_fields:
            raise ValueError(f"method {method!r} has no λ; drop it from --lams")
        if len(grid) > 1:
            cands = []
            for lam in grid:
                val = _final_val(one(method, lam, 0))
                cands.append((lam, val))
                rows.append({"phase": "selection", "method": method, "lam": lam, "seed": 0,
                             **{k: val.get(k) for k in REPORT_METRICS}})
            chosen[method] = choose_lam(cands, erm_val)
            log(f"{method}: λ = {chosen[method]:g} chosen on validation")
        else:
            chosen[method] = grid[0] if grid else None
        for seed in range(seeds):
            res = one(method, chosen[method], seed)
            if method == "erm" and seed == 0:
                erm_val = _final_val(res)
            final = res.get("final") or {}
            # the auditor's own choice on validation: last_layer's α, FairNet's gate τ
            chosen_by_auditor = final.get("lam") if final.get("lam") is not None else final.get("tau")
            rows.append({"phase": "test", "method": method, "lam": float(res.get("lam") or 0.0),
                         "auditor_lam": chosen_by_auditor, "seed": seed, "wall_time_s": res["wall_time_s"],
                         **{k: res["metrics"].get(k) for k in REPORT_METRICS}})
    return rows


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (method, λ) of the test rows, in first-seen order."""
    rows = [r for r in rows if r.get("phase", "test") == "test"]
    keys = list(dict.fromkeys((r["method"], r["lam"]) for r in rows))
    out = []
    for method, lam in keys:
        group = [r for r in rows if r["method"] == method and r["lam"] == lam]
        entry = {"method": method, "lam": lam, "seeds": len(group),
                 "auditor_lams": [g["auditor_lam"] for g in group if g.get("auditor_lam") is not None]}
        for k in (*REPORT_METRICS, "wall_time_s"):
            entry[k], entry[f"{k}_std"] = _mean_std([g.get(k) for g in group])
        out.append(entry)
    return out


def _cut(value: float, ref: float) -> float:
    """Relative change of a gap against ERM's (−0.5 = halved); nan without a usable reference."""
    return (value - ref) / ref if ref and math.isfinite(ref) and math.isfinite(value) else float("nan")


def _lam_cell(s: dict) -> str:
    """λ of a summary row: the grid's, the auditor's own choices per seed (last_layer's α; with
    FairNet's λ, its τ), or — for none."""
    if s.get("auditor_lams") and method_spec(s["method"]).gated:
        return f"{s['lam']:g}; τ on val: " + "/".join(f"{a:g}" for a in s["auditor_lams"])
    if s.get("auditor_lams"):
        return "α on val: " + "/".join(f"{a:g}" for a in s["auditor_lams"])
    if "lam" not in method_spec(s["method"]).config.model_fields:
        return "—"
    return f"{s['lam']:g}"


def summary_lines(summary: list[dict]) -> list[str]:
    """Markdown summary against ERM: ΔDPD, ΔEOD, Δaccuracy per method; best within 1 point."""
    erm = next((s for s in summary if s["method"] == "erm"), None)
    if erm is None:
        return []
    dpd, eod, acc = "demographic_parity_difference", "equalized_odds_difference", "accuracy"
    lines = ["", "Against ERM (means over seeds; a change within one std of either side is noise):", "",
             "| method | λ | DPD change | EOD change | accuracy change (points) |", "| --- | --- | --- | --- | --- |"]
    best = None
    for s in summary:
        if s["method"] == "erm":
            continue
        cd, ce = _cut(s[dpd], erm[dpd]), _cut(s[eod], erm[eod])
        da = 100 * (s[acc] - erm[acc])
        lines.append(f"| {s['method']} | {_lam_cell(s)} | {cd:+.0%} | {ce:+.0%} | {da:+.1f} |")
        if da >= -100 * ACCURACY_TOLERANCE and math.isfinite(cd) and math.isfinite(ce):
            if best is None or max(cd, ce) < best[1]:
                best = (s, max(cd, ce))
    lines.append("")
    lines.append(f"Best method within 1 accuracy point of ERM: **{best[0]['method']}** (λ: {_lam_cell(best[0])}; "
                 f"both gaps cut by at least {-best[1]:.0%})" if best and best[1] < 0 else
                 "Best method within 1 accuracy point of ERM: none cuts both gaps.")
    return lines


def write_outputs(rows: list[dict], out: Path, title: str = "", dataset: str = "") -> list[dict]:
    """Write table.csv, table.md, selection.md, summary.json and pareto.png into ``out``.

    ``dataset``: the config path recorded in ``summary.json``. Returns the summary rows.
    """
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
        lines.append(f"| {s['method']} | {_lam_cell(s)} | {s['seeds']} | " + " | ".join(cells)
                     + f" | {s['wall_time_s']:.0f} |")
    lines += summary_lines(summary)
    (out / "table.md").write_text("\n".join(lines).lstrip() + "\n")
    sel = [r for r in rows if r.get("phase") == "selection"]
    sel_lines = ["| method | λ | val acc | val DPD | val EOD |", "| --- | --- | --- | --- | --- |"]
    sel_lines += [f"| {r['method']} | {r['lam']:g} | {r['accuracy']:.3f} | "
                  f"{r['demographic_parity_difference'] or 0:.3f} | {r['equalized_odds_difference'] or 0:.3f} |"
                  for r in sel]
    (out / "selection.md").write_text("\n".join(sel_lines) + "\n")
    json_rows = [{"dataset": dataset, "method": s["method"], "lam": s["lam"], "seeds": s["seeds"],
                  "auditor_lams": s["auditor_lams"],
                  **{k: {"mean": _json_num(s[k]), "std": _json_num(s[k + "_std"])} for k in REPORT_METRICS}}
                 for s in summary]
    (out / "summary.json").write_text(json.dumps(json_rows, indent=1) + "\n")
    _pareto(summary, out / "pareto.png", title)
    return summary


def _json_num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _pareto(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"erm": "black", "unlearning": "tab:blue", "adversarial": "tab:red",
              "orthogonality": "tab:green", "entropy": "tab:purple", "penalty": "tab:orange",
              "last_layer": "tab:brown"}
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
