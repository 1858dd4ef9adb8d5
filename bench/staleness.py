"""What a stale fairness signal costs: K steps per signal against the per-step ideal (K = 1).

    python bench/staleness.py [--config examples/bench/utkface_race_binary_biased.toml]
                              [--methods penalty=1,adversarial=0.1] [--ks 1,5,20]
                              [--batches 64,256] [--seed 0] [--out runs/staleness] [--json out.json]

The round signal is computed once at the round's start and added at each of the K =
``local_steps`` steps of the round (``developer/trainer.py``). This runs, co-located, each
(method, λ) with the same total number of steps (the config's ``rounds × local_steps``) cut into
rounds of K steps, for every K and auditor batch size, with ``overlap`` on (the signal is then one
round staler still, as in a deployment that hides the auditor's latency), plus ERM. ERM's training
does not depend on K. Prints one row per run (test accuracy, DPD, EOD, wall time) and, last,
``staleness_eod_ratio=<EOD at the largest K / EOD at K = 1>`` for the first method and batch.
Runs whose ``results.json`` exists under ``--out`` are read back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, machine_info, print_table, write_json  # noqa: E402

DEFAULT_CONFIG = REPO / "examples" / "bench" / "utkface_race_binary_biased.toml"


def _run(run, out: Path) -> dict:
    from fairsplit.deploy.colocated import run_colocated

    done = out / "results.json"
    return json.loads(done.read_text()) if done.exists() else run_colocated(run, out)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--methods", default="penalty=1,adversarial=0.1", help="method=λ, comma-separated")
    ap.add_argument("--ks", default="1,5,20", help="steps per signal")
    ap.add_argument("--batches", default="64,256", help="auditor batch sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-overlap", action="store_true", help="without overlap")
    ap.add_argument("--out", type=Path, default=Path("runs/staleness"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from fairsplit.deploy.config import load_run_file

    base = load_run_file(args.config)
    # a study of how fresh an exact signal must be (docs/methods.md, "Signal freshness"): exact
    # releases; under DP the signal is noise at these batch sizes (docs/privacy.md)
    base.auditor.privacy.enabled = False
    total = base.experiment.rounds * base.experiment.local_steps
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    methods = [(m.split("=")[0], float(m.split("=")[1])) for m in args.methods.split(",")]
    overlap = not args.no_overlap
    rows = []

    def record(method, lam, k, batch, res):
        m = res["metrics"]
        rows.append({"method": method, "lam": lam, "K": k, "auditor_batch": batch,
                     "accuracy": m["accuracy"], "DPD": m["demographic_parity_difference"],
                     "EOD": m["equalized_odds_difference"], "wall_s": res["wall_time_s"]})
        print(rows[-1], flush=True)

    erm = base.model_copy(deep=True)
    erm.experiment.seed = args.seed
    record("erm", 0.0, total, 0, _run(erm, args.out / f"erm-seed{args.seed}"))
    for method, lam in methods:
        for batch in batches:
            for k in ks:
                if total % k:
                    raise SystemExit(f"K={k} does not divide the {total} steps")
                r = base.model_copy(deep=True)
                r.experiment.method = base.bench.method_config(method, lam)
                r.experiment.method.auditor_batch_size = batch
                r.experiment.seed = args.seed
                r.experiment.local_steps = k
                r.experiment.rounds = total // k
                r.experiment.eval_every = max(1, r.experiment.rounds // 4)
                r.experiment.overlap = overlap
                tag = f"{method}-lam{lam:g}-b{batch}-K{k}-{'overlap' if overlap else 'seq'}-seed{args.seed}"
                record(method, lam, k, batch, _run(r, args.out / tag))
    print_table(rows, [("method", "method"), ("lam", "λ"), ("K", "K"), ("auditor_batch", "auditor batch"),
                       ("accuracy", "accuracy"), ("DPD", "DPD"), ("EOD", "EOD"), ("wall_s", "wall (s)")])
    first = [r for r in rows if r["method"] == methods[0][0] and r["auditor_batch"] == batches[0]]
    lo, hi = min(first, key=lambda r: r["K"]), max(first, key=lambda r: r["K"])
    ratio = hi["EOD"] / max(lo["EOD"], 1e-9)
    if args.json:
        write_json(args.json, {"machine": machine_info(), "config": str(args.config), "overlap": overlap,
                               "total_steps": total, "rows": rows, "staleness_eod_ratio": ratio})
    print(f"staleness_eod_ratio={ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
