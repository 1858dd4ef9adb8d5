"""What the privacy split costs: the same experiment split over Flower vs co-located.

    python bench/overhead.py [--configs bench/configs/overhead_utkface.toml,...] [--reps 3]
                             [--rounds 20] [--insecure] [--json out.json]

For each configuration (default: UTKFace + DeiT-Tiny and Adult-text + MiniLM, 20 rounds,
adversarial debiasing so that every round carries a fairness signal), runs, alternating,

(a) split: both parties as separate processes over the real Flower deployment on loopback
    (``deploy.launch.run_local``: SuperLink with TLS and SuperNode authentication, the auditor's
    SuperNode + vetted executor, the developer's ServerApp), and
(b) co-located: both parties in one process, no Flower (``deploy.colocated.run_colocated``),

with the same method, data, seed and number of steps (and the same ``overlap`` setting:
``--overlap on`` makes the developer train round r+1 while the auditor answers round r; the
co-located runner then still runs the auditor's work in sequence). Wall time is measured around the whole
call: process start-up, model builds and data loading are included on both sides. Prints each
repetition and the medians; the last line is ``overhead_ratio=<median split / median
co-located>`` for the first configuration.

``--warm``: the split arm runs on one long-lived deployment (:class:`deploy.launch.LocalDeployment`,
started before the repetitions, as a ``fairsplit tune`` study or ``fairsplit developer`` with
several configs uses it): each split repetition is a new Flower run on it, so the processes'
start-up is paid once, outside the timed calls. Both arms then first make one untimed warm-up
run (the executors', and the co-located process's, first model build and data decode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, machine_info, print_table, write_json  # noqa: E402

FAIRNESS_KEYS = ("accuracy", "auc", "demographic_parity_difference", "equalized_odds_difference",
                 "worst_group_accuracy")
DEFAULT_CONFIGS = [REPO / "bench" / "configs" / "overhead_utkface.toml",
                   REPO / "bench" / "configs" / "overhead_text.toml"]


def _load(path: Path, rounds: int | None, overlap: bool | None = None):
    from fairsplit.deploy.config import load_run_file

    run = load_run_file(path)
    update: dict = {}
    if rounds is not None:
        update["rounds"] = rounds
    if overlap is not None:
        update["overlap"] = overlap
    return run.model_copy(update={"experiment": run.experiment.model_copy(update=update)})


def measure(path: Path, reps: int, rounds: int | None, insecure: bool, workdir: Path,
            overlap: bool | None = None, colocated_threads: int | None = None, warm: bool = False) -> dict:
    """Alternate split and co-located runs of one config; returns walls, medians and the ratio.

    ``colocated_threads``: torch threads of the co-located process (default: the config's, the
    same as each split party's).
    """
    from fairsplit.deploy.colocated import run_colocated

    run = _load(path, rounds, overlap)
    co_run = run
    if colocated_threads is not None:
        co_run = run.model_copy(update={
            "developer": run.developer.model_copy(update={"num_threads": colocated_threads}),
            "auditor": run.auditor.model_copy(update={"num_threads": colocated_threads})})
    walls: dict[str, list[float]] = {"split": [], "colocated": []}
    details: list[dict] = []
    deployment = None
    if warm:
        from fairsplit.deploy.launch import LocalDeployment

        deployment = LocalDeployment(run, workdir / f"{path.stem}-deployment", insecure=insecure).__enter__()
        t0 = time.perf_counter()
        deployment.run(run, workdir / f"{path.stem}-split-warmup")
        print(f"  {path.stem} warm-up split run: {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
        t0 = time.perf_counter()
        run_colocated(co_run, workdir / f"{path.stem}-colocated-warmup")
        print(f"  {path.stem} warm-up co-located run: {time.perf_counter() - t0:.1f} s (not counted)", flush=True)
    try:
        for rep in range(reps):
            _rep(rep, path, run, co_run, deployment, insecure, workdir, walls, details)
    finally:
        if deployment is not None:
            deployment.__exit__(None, None, None)
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {"config": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "rounds": run.experiment.rounds, "overlap": run.experiment.overlap, "warm": warm,
            "colocated_threads": co_run.developer.num_threads, "walls": walls, "median": med,
            "overhead_ratio": med["split"] / med["colocated"], "runs": details}


def _rep(rep, path, run, co_run, deployment, insecure, workdir, walls, details) -> None:
    from fairsplit.deploy.colocated import run_colocated
    from fairsplit.deploy.launch import run_local

    order = ("split", "colocated") if rep % 2 == 0 else ("colocated", "split")
    for mode in order:
        out = workdir / f"{path.stem}-{mode}-{rep}"
        t0 = time.perf_counter()
        if mode == "split":
            res = (deployment.run(run, out) if deployment is not None
                   else run_local(run, out, insecure=insecure))
        else:
            res = run_colocated(co_run, out)
        wall = time.perf_counter() - t0
        walls[mode].append(wall)
        details.append({"config": path.name, "rep": rep, "mode": mode, "wall_s": wall,
                        "train_time_s": res["train_time_s"], "channel_time_s": res["channel_time_s"],
                        **{k: res["metrics"][k] for k in FAIRNESS_KEYS}})
        print(f"  {path.stem} rep {rep} {mode:>9}: {wall:7.1f} s (train {res['train_time_s']:.1f} s,"
              f" waiting for the auditor {res['channel_time_s']:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark; returns the first configuration's overhead ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(str(c) for c in DEFAULT_CONFIGS),
                   help="comma-separated run TOMLs")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="override the configs' rounds")
    p.add_argument("--insecure", action="store_true", help="split runs without TLS / node auth")
    p.add_argument("--overlap", choices=["config", "on", "off"], default="config",
                   help="train round r+1 while the auditor answers round r (both arms)")
    p.add_argument("--colocated-threads", type=int, default=None,
                   help="torch threads of the co-located arm (default: the config's per-party value)")
    p.add_argument("--warm", action="store_true", help="split runs on one long-lived deployment "
                   "(processes started once, outside the timed runs)")
    p.add_argument("--workdir", type=Path, default=None, help="keep run outputs here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    configs = [Path(c) for c in args.configs.split(",") if c.strip()]
    missing = [str(c) for c in configs if not c.exists()]
    if missing:
        raise SystemExit(f"config(s) not found: {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        results = []
        for path in configs:
            print(f"{path.name}: {args.reps} repetition(s) each of split and co-located", flush=True)
            overlap = None if args.overlap == "config" else args.overlap == "on"
            results.append(measure(path, args.reps, args.rounds, args.insecure, workdir, overlap,
                                   args.colocated_threads, args.warm))
    print_table([{"config": Path(r["config"]).stem, "rounds": r["rounds"], "overlap": str(r["overlap"]),
                  "split": r["median"]["split"], "colocated": r["median"]["colocated"],
                  "ratio": r["overhead_ratio"]} for r in results],
                [("config", "config"), ("rounds", "rounds"), ("overlap", "overlap"),
                 ("split", "split median (s)"),
                 ("colocated", "co-located median (s)"), ("ratio", "overhead_ratio")])
    if args.json:
        write_json(args.json, {"machine": machine_info(), "results": results})
    ratio = results[0]["overhead_ratio"]
    print(f"overhead_ratio={ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
