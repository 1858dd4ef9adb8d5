"""Where one round's time goes in a split run over the real Flower deployment (loopback).

    python bench/round_latency.py [--config bench/configs/overhead_utkface.toml] [--rounds 6]
                                  [--json out.json]

One split run without ``overlap`` (``deploy.launch.run_local``: TLS, SuperNode authentication,
the auditor's long-lived vetted executor). Per request, from the two parties' audit logs (each line carries a
timestamp in ms) and the developer's metrics:

* developer compute: training time of a round (``train_time_s`` / rounds);
* round trip: developer sent → developer received the reply;
* auditor compute: auditor received → auditor sent (decode, checks, forward/backward, encode);
* transport and polling: round trip − auditor compute (the SuperNode polls its SuperLink every
  0.2 s when idle, Flower's default 3 s with ``FAIRSPLIT_SUPERNODE_POLL=3``; the executor polls
  the SuperNode every 0.1 s and the ServerApp the SuperLink every 50 ms);
* (de)serialisation: the four codec steps of one request/reply pair (make_request,
  parse_request, make_reply, parse_reply), timed in this process on the same model;
* ClientApp start and model build: the first request's auditor compute minus the median of the
  later ones (the executor builds the model and loads the data once); and, for comparison, what
  Flower's default per-message ClientApp process would pay every message: a fresh Python process
  importing the auditor's ClientApp and building the model (timed here as a subprocess).

Last line: ``round_latency_s=<median round trip of the signal requests>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, machine_info, print_table, write_json  # noqa: E402

DEFAULT_CONFIG = REPO / "bench" / "configs" / "overhead_utkface.toml"


def _t(row: dict) -> float:
    return dt.datetime.fromisoformat(row["time"].replace("Z", "+00:00")).timestamp()


def _pairs(path: Path, first: str, second: str) -> list[dict]:
    """Match each ``first``-direction line with the next ``second`` line of the same round/type."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out, open_ = [], {}
    for r in rows:
        key = (r["message_type"], r["round"])
        if r["direction"] == first:
            open_[key] = r
        elif r["direction"] == second and key in open_:
            a = open_.pop(key)
            out.append({"message_type": key[0], "round": key[1], "seconds": _t(r) - _t(a),
                        "records": sorted(r["records"])})
    return out


def codec_seconds(run, reps: int = 5) -> float:
    """Median time of make_request + parse_request + make_reply + parse_reply (one round)."""
    import torch

    from fairsplit.protocol.config import experiment_fingerprint
    from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_reply, make_request, parse_reply, parse_request
    from fairsplit.protocol.model import adapter_state, build_model, head_state, state_spec

    model = build_model(run.experiment.model_copy(update={"model": run.experiment.model.model_copy(
        update={"pretrained": False, "weights": None})}))
    adapter, head = adapter_state(model), head_state(model)
    a_spec, h_spec = state_spec(adapter), state_spec(head)
    req = RoundRequest(round=1, split="none", want="signal", method=run.experiment.method.name,
                       fingerprint=experiment_fingerprint(run.experiment), protocol=PROTOCOL_VERSION)
    signal = {k: torch.randn_like(v) for k, v in adapter.items()}
    metrics = {"n": 64, "objective": 0.5, "sensitive_accuracy": 0.6, "signal_norm": 1.0}
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        content = make_request(adapter, None, req)
        parse_request(content, a_spec, h_spec)
        reply = make_reply(req, signal=signal, signal_metrics=metrics, adapter_spec=a_spec)
        parse_reply(reply, req, a_spec, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fresh_clientapp_seconds(aud_cfg: Path) -> float:
    """A fresh process importing the auditor's ClientApp and building its model (Flower's
    default per-message cost, data loading excluded)."""
    code = ("import time; t=time.perf_counter(); import fairsplit.auditor.clientapp; "
            "from fairsplit.auditor.config import load_auditor_file; from fairsplit.auditor.service import AuditorService; "
            "import tempfile; "
            f"f=load_auditor_file({str(aud_cfg)!r}); s=AuditorService(f.experiment, "
            "f.auditor.model_copy(update={'state_dir': f.auditor.state_dir or tempfile.mkdtemp()})); s.model; "
            "print(time.perf_counter()-t)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=600)
    del t0
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> float:
    """Run the breakdown; returns the median round trip of signal requests (s)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from fairsplit.deploy.launch import run_local
    from fairsplit.deploy.config import load_run_file

    run = load_run_file(args.config)
    # without overlap: each request's round trip is then pure waiting, not hidden behind training
    run = run.model_copy(update={"experiment": run.experiment.model_copy(
        update={"rounds": args.rounds, "overlap": False})})
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.workdir or Path(tmp)) / "split"
        t0 = time.perf_counter()
        res = run_local(run, out)
        wall = time.perf_counter() - t0
        trips = _pairs(out / "audit.jsonl", "sent", "received")
        auditor = _pairs(out / "auditor" / "audit.jsonl", "received", "sent")
        fresh = fresh_clientapp_seconds(out / "parties" / "auditor.toml")
    codec = codec_seconds(run)
    aud_by: dict[tuple, list[float]] = {}
    for a in auditor:  # in order: a round's validation and the final test share (type, round)
        aud_by.setdefault((a["message_type"], a["round"]), []).append(a["seconds"])
    rows = []
    for tr in trips:
        left = aud_by.get((tr["message_type"], tr["round"])) or [float("nan")]
        a = left.pop(0)
        rows.append({"round": tr["round"], "type": tr["message_type"], "records": ",".join(tr["records"]),
                     "round_trip": tr["seconds"], "auditor": a, "transport": tr["seconds"] - a})
    print_table(rows, [("round", "round"), ("type", "message"), ("records", "reply records"),
                       ("round_trip", "round trip (s)"), ("auditor", "auditor compute (s)"),
                       ("transport", "transport + polling (s)")])
    later = [r["auditor"] for r in rows[1:]] or [rows[0]["auditor"]]
    signal_trips = [r["round_trip"] for r in rows if "signal" in r["records"]] or [r["round_trip"] for r in rows]
    summary = {
        "developer compute per round (s)": res["train_time_s"] / run.experiment.rounds,
        "round trip, median (s)": statistics.median(r["round_trip"] for r in rows),
        "auditor compute, median (s)": statistics.median(later),
        "transport + polling, median (s)": statistics.median(r["transport"] for r in rows),
        "(de)serialisation per round trip (s)": codec,
        "first request: model build + data load in the executor (s)": rows[0]["auditor"] - statistics.median(later),
        "fresh ClientApp process + model build, per message in Flower's default mode (s)": fresh,
        "run wall time (s)": wall,
    }
    print_table([{"what": k, "s": v} for k, v in summary.items()], [("what", "component"), ("s", "seconds")])
    if args.json:
        write_json(args.json, {"machine": machine_info(), "config": str(args.config), "rows": rows,
                               "summary": summary})
    med = statistics.median(signal_trips)
    print(f"round_latency_s={med:.3f}")
    return med


if __name__ == "__main__":
    main()
