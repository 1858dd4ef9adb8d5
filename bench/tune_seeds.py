"""Re-run FairTune studies' choices and their default placement over seeds, on the test part.

    python bench/tune_seeds.py runs/tune_wga runs/tune_eod [--seeds 3] [--control] [--json out.json]

A study chooses its trial on the auditor's validation reports of one seed; this benchmark
measures what the choice is worth. For each study folder (``fairsplit tune --out``), the chosen
trial (``best.toml``) and the study's baseline trial (trial 0: the default placement, every
module of every block) are run co-located with seeds 0..N−1 (``[experiment] seed``; each run its
own fresh auditor). ``--control`` adds the default placement at the chosen trial's rank and
learning rate, to separate placement from learning rate. Prints, per configuration, mean ± std over the seeds of the test accuracy,
worst-group accuracy, equalized-odds and demographic-parity differences, and the number of LoRA
modules. The last line is ``wga_gain=<chosen − default test worst-group accuracy>`` for the first
study.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, print_table, write_json  # noqa: E402

KEYS = ("accuracy", "worst_group_accuracy", "equalized_odds_difference", "demographic_parity_difference")


def _configs(study: Path, control: bool = False):
    """(label, RunFile) of the study's baseline trial, its chosen trial and (``control``) the
    default placement at the chosen r and lr."""
    from fairsplit.deploy.config import load_run_file
    from fairsplit.protocol.config import ExperimentConfig

    best = load_run_file(study / "best.toml")
    summary = json.loads((study / "summary.json").read_text())
    base_res = json.loads((study / "trials" / "000" / "results.json").read_text())
    base_exp = ExperimentConfig.model_validate(base_res["experiment"])
    base_exp = base_exp.model_copy(update={"model": base_exp.model.model_copy(update={"weights": best.experiment.model.weights})})
    chosen = summary["best"]["number"] if summary.get("best") else None
    out = [(f"{study.name}: default placement (trial 0)", best.model_copy(update={"experiment": base_exp})),
           (f"{study.name}: chosen (trial {chosen})", best)]
    if control:
        exp = best.experiment.model_copy(update={
            "lora": best.experiment.lora.model_copy(update={"target_modules": None}),
            "name": "control: default placement at the chosen r and lr"})
        out.append((f"{study.name}: control, default placement at the chosen r and lr",
                    best.model_copy(update={"experiment": exp})))
    return out


def measure(studies: list[Path], seeds: int, workdir: Path, control: bool = False) -> list[dict]:
    """Every study's default and chosen configuration over ``seeds`` seeds (co-located)."""
    from fairsplit.deploy.colocated import run_colocated

    rows = []
    for study in studies:
        for label, run in _configs(study, control):
            per_seed = []
            for seed in range(seeds):
                folder = workdir / f"{study.name}-{len(rows)}-{seed}"
                r = run.model_copy(update={  # a fresh auditor (its own ledger and noise), not the study's
                    "experiment": run.experiment.model_copy(update={"seed": seed}),
                    "auditor": run.auditor.model_copy(update={"state_dir": folder / "auditor"})})
                res = run_colocated(r, folder)
                per_seed.append({k: res["metrics"][k] for k in KEYS})
                print(f"  {label}, seed {seed}: " + ", ".join(f"{k} {per_seed[-1][k]:.4f}" for k in KEYS), flush=True)
            row = {"study": study.name, "config": label,
                   "lora_modules": len(run.experiment.lora.target_modules or []) or "default",
                   "r": run.experiment.lora.r,
                   "lr": run.experiment.lr, "seeds": per_seed}
            for k in KEYS:
                vals = [s[k] for s in per_seed]
                row[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark; returns the first study's chosen − default mean test WGA."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", type=Path, help="fairsplit tune output folders")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--control", action="store_true", help="also the default placement at the chosen r and lr")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    missing = [str(s) for s in args.studies if not (s / "best.toml").is_file()]
    if missing:
        raise SystemExit(f"no finished study (best.toml) in {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.studies, args.seeds, Path(tmp), args.control)

    def ms(r, k):
        return f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}"
    print_table([{"config": r["config"], "modules": r["lora_modules"], "r": r["r"], "lr": f"{r['lr']:.2e}",
                  **{k: ms(r, k) for k in KEYS}} for r in rows],
                [("config", "configuration"), ("modules", "LoRA modules"), ("r", "r"), ("lr", "lr"),
                 ("accuracy", "test accuracy"), ("worst_group_accuracy", "test WGA"),
                 ("equalized_odds_difference", "test EOD"), ("demographic_parity_difference", "test DPD")])
    if args.json:
        write_json(args.json, {"machine": machine_info(), "seeds": args.seeds, "rows": rows})
    gain = rows[1]["worst_group_accuracy"]["mean"] - rows[0]["worst_group_accuracy"]["mean"]  # chosen − default
    print(f"wga_gain={gain:.4f}")
    return gain


if __name__ == "__main__":
    main()
