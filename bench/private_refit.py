"""The private last-layer refit at several ε: ERM against last_layer with the ``stats`` refit (one
release of noisy cell counts and feature sums) and with the ``sgd`` refit (one DP-SGD path through
the α grid), seeds × ε, co-located, each run with a fresh auditor. ERM is trained once per seed:
its model and exact test metrics do not depend on ε (it asks the auditor only for reports).

Under DP the auditor's own test report is noisy by design (at ε = 1 its gaps are inflated by
the count noise), so this controlled study also evaluates every final model **exactly** on the
auditor's test part (it holds both parties' files); the table reports those exact metrics, and
the refit's wall time against ERM's.

``python bench/private_refit.py [--config run.toml] [--seeds 3] [--epsilons 1,8,inf]
[--refits stats,sgd] [--json PATH]``; without ``--config`` the embedded demo experiment.
Prints one line per (ε, method) with mean ± std over seeds, and ``cut_dpd=``/``cut_eod=`` of the
best refit at the first ε.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

from fairsplit.deploy.colocated import run_colocated  # noqa: E402
from fairsplit.deploy.demo import demo_run_file  # noqa: E402
from fairsplit.deploy.config import load_run_file  # noqa: E402
from fairsplit.protocol.data import load_split  # noqa: E402
from fairsplit.protocol.methods import method_spec  # noqa: E402
from fairsplit.protocol.metrics import fairness_report  # noqa: E402
from fairsplit.protocol.model import build_model, resolve_image_size  # noqa: E402

KEYS = ("accuracy", "demographic_parity_difference", "equalized_odds_difference", "worst_group_accuracy")


def exact_test_metrics(run, out: Path, test) -> dict:
    """The final model in ``out/model`` evaluated exactly on the auditor's test part."""
    model = build_model(run.experiment)
    set_peft_model_state_dict(model.backbone, load_file(str(out / "model" / "adapter_model.safetensors")))
    model.head.load_state_dict(load_file(str(out / "model" / "head.safetensors")))
    model.eval()
    scores = model.predict_scores(test.inputs, run.experiment.eval_batch_size, "cpu")
    rep = fairness_report(test.y, scores, test.s, run.experiment.threshold, 1)
    return {k: float(rep[k]) for k in KEYS}


def _variant(base, method: str, refit: str | None, eps: float, seed: int, state: Path):
    exp = base.experiment.model_copy(update={"seed": seed, "method": method_spec(method).config(name=method)})
    if refit is not None:
        exp = exp.model_copy(update={"method": exp.method.model_copy(update={"dp_refit": refit})})
    dp = eps != float("inf")
    pc = base.auditor.privacy.model_copy(update={"enabled": dp, **({"target_epsilon": eps,
                                                                    "epsilon_budget": max(eps, 1.0) * 6.5} if dp else {})})
    return base.model_copy(update={"experiment": exp, "auditor": base.auditor.model_copy(
        update={"privacy": pc, "state_dir": state})})


def measure(base, seeds: int, epsilons: list[float], refits: list[str]) -> list[dict]:
    """Rows ``{"epsilon", "method", "seeds": [per-seed exact metrics + wall time]}``."""
    test = load_split(base.auditor.data, base.experiment, "auditor",
                      resolve_image_size(base.experiment.model))["auditor_test"]
    rows, erm_rows = [], {}  # ERM's model and exact test metrics do not depend on ε: trained once per seed
    with tempfile.TemporaryDirectory() as tmp:
        for eps in epsilons:
            arms = [("erm", None)] + [("last_layer", r) for r in (refits if eps != float("inf") else ["exact"])]
            for method, refit in arms:
                per = []
                for seed in range(seeds):
                    if method == "erm" and seed in erm_rows:
                        per.append(erm_rows[seed])
                        continue
                    out = Path(tmp) / f"{eps}-{method}-{refit}-{seed}"
                    run = _variant(base, method, None if refit == "exact" else refit, eps, seed, out / "auditor")
                    t0 = time.perf_counter()
                    res = run_colocated(run, out)
                    row = exact_test_metrics(run, out, test)
                    row.update(wall_time_s=time.perf_counter() - t0, chosen=(res.get("final") or {}).get("lam"))
                    per.append(row)
                    if method == "erm":
                        erm_rows[seed] = row
                name = method if refit is None else f"{method} ({refit})"
                rows.append({"epsilon": "inf" if eps == float("inf") else eps, "method": name, "seeds": per,
                             **{k: {"mean": statistics.fmean(r[k] for r in per),
                                    "std": statistics.stdev([r[k] for r in per]) if len(per) > 1 else 0.0}
                                for k in KEYS + ("wall_time_s",)}})
                print(f"eps={rows[-1]['epsilon']} {name}: " + ", ".join(
                    f"{k} {rows[-1][k]['mean']:.3f} ± {rows[-1][k]['std']:.3f}" for k in KEYS)
                    + f", α {[r['chosen'] for r in per]}", flush=True)
    return rows


def result_rows(rows: list[dict], dataset: str, report_fraction: float | None = None) -> list[dict]:
    """``rows`` in the form of ``docs/results/private_fairness.json``: one per (dataset, ε,
    method) with ``seeds`` (a count) and each metric as ``{"mean", "std"}``; private rows (finite
    ε) also carry ``report_epsilon_fraction``, the share of ε the run's reports spent."""
    return [{"dataset": dataset, "epsilon": r["epsilon"], "method": r["method"], "seeds": len(r["seeds"]),
             **({"report_epsilon_fraction": report_fraction}
                if report_fraction is not None and r["epsilon"] != "inf" else {}),
             **{k: r[k] for k in KEYS}} for r in rows]


def _key(row: dict) -> tuple:
    return row["dataset"], row["epsilon"], row["method"], row.get("report_epsilon_fraction", 1.0)


def append_results(path: Path, rows: list[dict]) -> None:
    """Merge ``rows`` into the JSON list at ``path`` (same dataset, ε, method and report fraction
    replaced; rows without a fraction were measured with reports at the run's whole ε)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    keys = {_key(r) for r in rows}
    write_json(path, [r for r in old if _key(r) not in keys] + rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epsilons", default="1,8,inf")
    p.add_argument("--refits", default="stats,sgd")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None,
                   help="merge the rows into this JSON list (docs/results/private_fairness.json)")
    p.add_argument("--dataset", default=None, help="the dataset's name in --results")
    args = p.parse_args(argv)
    base = load_run_file(args.config) if args.config else demo_run_file()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    rows = measure(base, args.seeds, epsilons, args.refits.split(","))
    first = [r for r in rows if r["epsilon"] == rows[0]["epsilon"]]
    erm, fair = first[0], min(first[1:], key=lambda r: r["equalized_odds_difference"]["mean"])
    for k, short in (("demographic_parity_difference", "dpd"), ("equalized_odds_difference", "eod")):
        print(f"cut_{short}={1 - fair[k]['mean'] / max(erm[k]['mean'], 1e-12):.3f}")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "config": str(args.config or "demo"),
                               "seeds": args.seeds, "rows": rows})
    if args.results:
        append_results(args.results, result_rows(rows, args.dataset or str(args.config or "demo"),
                                                 base.auditor.privacy.report_epsilon_fraction))


if __name__ == "__main__":
    main()
