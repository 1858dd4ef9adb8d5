"""The seeds' methods in the papers' setting, on a GPU: one command, one table.

The papers behind ``orthogonality``, ``entropy`` and ``adversarial`` report utility and fairness
gains together with a larger backbone and full training epochs; the CPU benchmarks here use
DeiT-Tiny at 64 px and 160 steps. This script runs ``fairsplit bench fairness`` (λ chosen on the
auditor's validation part, seed 0, then ``--seeds`` seeds) on a config close to the papers'
protocol (``examples/bench/seed_setting_utkface.toml``: DeiT-Tiny at 224 px, 10 epochs over the
developer's biased UTKFace split, ``device = "cuda"``) once per ε of ``--epsilons`` (``inf``: exact
releases; a number: the auditor's DP at that ε per run, each run with its own auditor), and
prints one table of mean ± std per (ε, method) with the cut of DPD and EOD against ERM.

``python bench/seed_setting.py [--config PATH] [--methods erm,...] [--seeds 3] [--epsilons inf,1]
[--out DIR] [--dry-run]``. ``--dry-run`` prints the runs it would make and exits (no GPU needed).
Interrupted runs continue where they stopped (``run_fairness_bench`` reads finished runs back).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fairsplit.deploy.bench import run_fairness_bench, write_outputs  # noqa: E402
from fairsplit.deploy.cli import with_epsilon  # noqa: E402
from fairsplit.deploy.config import load_run_file  # noqa: E402
from fairsplit.protocol.methods import METHODS  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "bench" / "seed_setting_utkface.toml"
DEFAULT_METHODS = "erm,adversarial,entropy,orthogonality,last_layer"


def plan(run, methods: list[str], seeds: int, epsilons: list[str]) -> list[str]:
    """One line per run the benchmark would make (λ grid from the method table, seed 0; then
    ``seeds`` seeds at the chosen λ)."""
    lines = []
    for eps in epsilons:
        for m in methods:
            lams = METHODS[m].lams or (None,)
            lines += [f"ε={eps} {m} λ={lam} seed=0" for lam in lams]
            lines += [f"ε={eps} {m} λ=<chosen> seed={s}" for s in range(1, seeds)]
    exp = run.experiment
    lines.append(f"{len(lines)} runs of {exp.rounds} rounds at {exp.model.img_size} px on "
                 f"developer device {run.developer.device!r}, auditor device {run.auditor.device!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilons", default="inf,1", help="comma-separated: 'inf' (exact) or ε per run")
    ap.add_argument("--out", type=Path, default=Path("runs/seed_setting"))
    ap.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    epsilons = [e.strip() for e in args.epsilons.split(",") if e.strip()]
    run = load_run_file(args.config)
    if args.dry_run:
        print("\n".join(plan(run, methods, args.seeds, epsilons)))
        return 0
    table = ["| ε | method | λ | accuracy | DPD | EOD | WGA | DPD cut | EOD cut |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for eps in epsilons:
        out = args.out / f"eps-{eps}"
        rows = run_fairness_bench(with_epsilon(run, eps), methods, args.seeds, out)
        summary = write_outputs(rows, out, run.experiment.name, dataset=str(args.config))
        erm = next((s for s in summary if s["method"] == "erm"), None)
        for s in summary:
            def cell(k, s=s):  # a gap is undefined (None) when a group has no examples of a class
                if s.get(k) is None:
                    return "–"
                return f"{s[k]:.3f} ± {s.get(k + '_std') or 0.0:.3f}"

            def cut(k, s=s):
                if erm is None or not erm.get(k) or s.get(k) is None:
                    return "–"
                return f"{100 * (s[k] / erm[k] - 1):+.0f} %"

            table.append(f"| {eps} | {s['method']} | {s.get('lam', '')} | {cell('accuracy')} | "
                         f"{cell('demographic_parity_difference')} | {cell('equalized_odds_difference')} | "
                         f"{cell('worst_group_accuracy')} | {cut('demographic_parity_difference')} | "
                         f"{cut('equalized_odds_difference')} |")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
