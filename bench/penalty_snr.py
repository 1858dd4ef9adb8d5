"""Can `penalty`'s DP signal see a gap? Its dead zone against the batch and the number of signals.

    python bench/penalty_snr.py [--config examples/bench/utkface_race_binary_biased.toml]
                                [--n-train 1955] [--groups 2] [--epsilon 1]
                                [--batches 64,128,256,512,1024,all] [--signals 160,40,16]
                                [--gaps 0.06,0.30] [--json out.json]

Under the auditor's DP, `penalty` releases per signal one sampled Gaussian step: the clipped
per-example gradients and the batch's per-(group, label) counts and sums of p, which linearise
the next round's fairness term (RaCO-DP's noisy histogram, Yaghini et al. 2026). A group's
relative gap |r_g − 1| within 3 noise standard deviations gives no gradient
(:func:`auditor.methods.penalty.dead_zone`). For each number of signals per run T and each
expected batch B (``all``: the whole train part, q = 1) this calibrates, with the auditor's own
accounting (:meth:`auditor.methods.penalty.Penalty.dp_events`, ``dp-accounting``'s RDP
accountant), the noise multiplier σ at which a run of T signals spends ``--epsilon`` on a train
part of ``--n-train`` rows, and prints σ, the dead zone, and, for each of ``--gaps`` (the
relative gaps a model has, measured elsewhere), the ratio gap / sd(r_g). ``--config`` (default:
the embedded demo's): its experiment's number of signal requests is the first T. The last line is
``dead_zone_at_config=<dead zone at the config's T and --batch>``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, print_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=None, help="run file: its experiment's signals per run")
    ap.add_argument("--n-train", type=int, default=1955, help="rows of the auditor's train part (biased UTKFace: 1955)")
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=128, help="the batch of the last line")
    ap.add_argument("--batches", default="64,128,256,512,1024,all")
    ap.add_argument("--signals", default="160,40,16")
    ap.add_argument("--gaps", default="", help="relative gaps |r_g - 1| to compare with the noise")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from fairsplit.auditor.accounting import RunNoise, calibrate_sigma
    from fairsplit.auditor.methods.penalty import DEAD_ZONE_Z, Penalty, dead_zone
    from fairsplit.protocol.method_configs import PenaltyConfig
    from fairsplit.protocol.schedule import planned_requests

    from fairsplit.deploy.config import load_run_file
    from fairsplit.deploy.demo import demo_run_file

    base = (load_run_file(args.config) if args.config is not None else demo_run_file()).experiment
    base = base.model_copy(update={"method": PenaltyConfig(name="penalty")})
    config_t = sum(1 for r in planned_requests(base) if r[2] == "signal")
    signals = [config_t] + [int(t) for t in args.signals.split(",") if t and int(t) != config_t]
    batches = [args.n_train if b == "all" else int(b) for b in args.batches.split(",") if b]
    gaps = [float(g) for g in args.gaps.split(",") if g]
    n = args.n_train

    def sigma_for(t: int, batch: int) -> float:
        exp = base.model_copy(update={"rounds": t, "local_steps": 1, "eval_every": t,
                                      "method": PenaltyConfig(name="penalty", auditor_batch_size=batch)})
        assert sum(1 for r in planned_requests(exp) if r[2] == "signal") == t

        def events(s: float) -> list[dict]:
            return [e for e in Penalty.dp_events(exp.method, exp, n, RunNoise(s, s, s))
                    if e["part"] == "auditor_train"]
        return calibrate_sigma(events, args.epsilon, args.delta)

    rows, last = [], None
    for t in signals:
        for b in sorted(set(batches)):
            sigma = sigma_for(t, b)
            b_exp = min(1.0, b / n) * n
            zone = dead_zone(sigma, b_exp, args.groups)
            row = {"signals": t, "batch": round(b_exp), "q": b_exp / n, "sigma": sigma, "dead_zone": zone}
            for g in gaps:
                row[f"gap {g}"] = g / (zone / DEAD_ZONE_Z)
            rows.append(row)
            if t == config_t and b == args.batch:
                last = zone
    print(f"penalty under DP: ε = {args.epsilon} per run, δ = {args.delta}, train part {n} rows, "
          f"{args.groups} groups; the config's signals per run: {config_t}")
    cols = [("signals", "signals T"), ("batch", "expected batch"), ("q", "q"), ("sigma", "σ"),
            ("dead_zone", "dead zone (|r_g − 1|)")] + [(f"gap {g}", f"gap {g} / sd") for g in gaps]
    print_table(rows, cols)
    if args.json:
        write_json(args.json, {"epsilon": args.epsilon, "delta": args.delta, "n_train": n,
                               "groups": args.groups, "rows": rows, "machine": machine_info()})
    if last is None:
        last = dead_zone(sigma_for(config_t, args.batch), min(args.batch, n), args.groups)
    print(f"dead_zone_at_config={last:.3f}")
    return 0 if math.isfinite(last) else 1


if __name__ == "__main__":
    raise SystemExit(main())
