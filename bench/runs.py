"""The fixed start-up cost of one more run: a warm deployment against a fresh one per run.

    python bench/runs.py [--config bench/configs/overhead_utkface.toml] [--rounds 2] [--runs 5]
                         [--cold 2] [--insecure] [--json out.json]

(a) warm: one :class:`deploy.launch.LocalDeployment` (SuperLink ``--isolation process``, the
    developer's executor, the auditor's SuperNode and executor) serves ``--runs`` runs of the
    config one after another, each a new Flower run, as a ``fairsplit tune`` study's trials are;
    the first run (the executors' first model build and data decode) is reported apart;
(b) cold: ``--cold`` runs each on a fresh deployment (``deploy.launch.run_local``: processes
    started and stopped around every run, what ``fairsplit run`` does).

A run's start-up cost is its wall time around the call minus the developer loop's own time in
rounds (``results.json``: ``wall_time_s − setup_time_s``): run submission, the executor picking
up the task, the developer's model build and data load, finishing and status; plus, cold, the
processes' start and stop. The last line is ``per_run_startup_s=<median over the warm runs
after the first>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, machine_info, print_table, write_json  # noqa: E402

DEFAULT_CONFIG = REPO / "bench" / "configs" / "overhead_utkface.toml"


def _startup(wall: float, res: dict) -> float:
    return wall - (res["wall_time_s"] - res["setup_time_s"])


def measure(path: Path, rounds: int | None, runs: int, cold: int, insecure: bool, workdir: Path) -> dict:
    """Warm runs on one deployment, then cold runs; returns every run's wall and start-up."""
    from fairsplit.deploy.launch import LocalDeployment, run_local
    from fairsplit.deploy.config import load_run_file

    run = load_run_file(path)
    if rounds is not None:
        run = run.model_copy(update={"experiment": run.experiment.model_copy(update={"rounds": rounds})})
    rows = []
    t0 = time.perf_counter()
    with LocalDeployment(run, workdir / "warm", insecure=insecure) as deployment:
        up = time.perf_counter() - t0
        print(f"  deployment up in {up:.1f} s", flush=True)
        for i in range(runs):
            t = time.perf_counter()
            res = deployment.run(run, workdir / "warm" / f"run{i}")
            wall = time.perf_counter() - t
            rows.append({"mode": "warm", "run": i, "wall_s": wall, "rounds_s": res["wall_time_s"] - res["setup_time_s"],
                         "setup_s": res["setup_time_s"], "startup_s": _startup(wall, res)})
            print(f"  warm run {i}: {wall:.2f} s, start-up {rows[-1]['startup_s']:.2f} s", flush=True)
    for i in range(cold):
        t = time.perf_counter()
        res = run_local(run, workdir / f"cold{i}", insecure=insecure)
        wall = time.perf_counter() - t
        rows.append({"mode": "cold", "run": i, "wall_s": wall, "rounds_s": res["wall_time_s"] - res["setup_time_s"],
                     "setup_s": res["setup_time_s"], "startup_s": _startup(wall, res)})
        print(f"  cold run {i}: {wall:.2f} s, start-up {rows[-1]['startup_s']:.2f} s", flush=True)
    warm = [r["startup_s"] for r in rows if r["mode"] == "warm" and r["run"] > 0]
    cold_s = [r["startup_s"] for r in rows if r["mode"] == "cold"]
    return {"config": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "rounds": run.experiment.rounds, "deployment_up_s": up, "runs": rows,
            "first_warm_startup_s": rows[0]["startup_s"] if rows else None,
            "per_run_startup_s": statistics.median(warm) if warm else float("nan"),
            "cold_startup_s": statistics.median(cold_s) if cold_s else None}


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark; returns the median start-up of the warm runs after the first."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--rounds", type=int, default=2, help="rounds per run (the start-up does not depend on it)")
    p.add_argument("--runs", type=int, default=5, help="runs on the warm deployment (≥ 2)")
    p.add_argument("--cold", type=int, default=2, help="runs each on a fresh deployment")
    p.add_argument("--insecure", action="store_true", help="no TLS / node authentication")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.runs < 2:
        raise SystemExit("--runs must be at least 2 (the first warm run is reported apart)")
    if not args.config.exists():
        raise SystemExit(f"config not found: {args.config}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        print(f"{args.config.name}: {args.runs} runs on one deployment, {args.cold} on fresh ones", flush=True)
        r = measure(args.config, args.rounds, args.runs, args.cold, args.insecure, workdir)
    print_table([{"mode": x["mode"], "run": x["run"], "wall": x["wall_s"], "rounds": x["rounds_s"],
                  "setup": x["setup_s"], "startup": x["startup_s"]} for x in r["runs"]],
                [("mode", "deployment"), ("run", "run"), ("wall", "wall (s)"), ("rounds", "in rounds (s)"),
                 ("setup", "model + data (s)"), ("startup", "start-up (s)")])
    if args.json:
        write_json(args.json, {"machine": machine_info(), "result": r})
    if r["cold_startup_s"] is not None:
        print(f"cold_startup_s={r['cold_startup_s']:.3f}")
    print(f"per_run_startup_s={r['per_run_startup_s']:.3f}")
    return r["per_run_startup_s"]


if __name__ == "__main__":
    main()
