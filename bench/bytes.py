"""Bytes per round each way against the adapter's own size (the floor), for several LoRA ranks.

    python bench/bytes.py [--config examples/utkface_erm.toml] [--text-config examples/adult_text_erm.toml | --no-text]
                          [--ranks 4,8,16,32] [--signal-method adversarial] [--json PATH]

For each rank the real model is built (``protocol.model.build_model`` with ``lora.r`` changed;
random init, since sizes do not depend on values: no weights and no data are read) and the real
messages of one round of each kind are built exactly as ``developer/loop.py`` and the auditor
build them (``protocol.messages.make_request`` / ``make_reply``) and measured with
``protocol.codec.payload_nbytes`` (what ``results.json`` reports), plus their protobuf size
(``flwr.common.serde.recorddict_to_proto(...).ByteSize()``, Flower's own envelope excluded):

* to the auditor: ``adapter`` + ``config`` on a round without evaluation (signal methods only;
  an ERM round without evaluation sends nothing), ``adapter`` + ``head`` + ``config`` on an
  evaluating round;
* from the auditor: ``report`` (ERM, evaluating round), ``signal`` + ``signal_metrics`` (signal
  method, round without evaluation), ``report`` + ``signal`` + ``signal_metrics`` (signal method,
  evaluating round); and, once per run for ``unlearning``, the dense ``update`` (ΔW_s per target
  module; independent of the rank).

The floor is the adapter's own size: Σ numel × element_size over the adapter tensors. Run totals
follow the config's schedule (``rounds``, ``eval_every``, the round-0 request and the final test
request) exactly as ``developer/loop.py`` sends them.

Last line: ``bytes_ratio_to_floor=<x>``, the largest (over models and ranks) ratio of the bytes
sent to the auditor in one evaluating round (adapter + head + config, the biggest request) to
the floor; 1.0 would mean not one byte beyond the adapter itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import REPO, group_names, machine_info, print_table, write_json  # noqa: E402
from fairsplit.protocol.methods import METHODS  # noqa: E402
from fairsplit.protocol.schedule import planned_requests  # noqa: E402

DEFAULT_CONFIG = REPO / "examples" / "utkface_erm.toml"
DEFAULT_TEXT_CONFIG = REPO / "examples" / "adult_text_erm.toml"


class _Messages:
    """Builds and measures the real request/reply of any (round, split, want) for one model."""

    def __init__(self, model, exp, auditor_cfg):
        from fairsplit.protocol.config import experiment_fingerprint
        from fairsplit.protocol.metrics import fairness_report
        from fairsplit.protocol.model import adapter_state, head_state, state_spec, update_spec

        self.model = model
        self.adapter = adapter_state(self.model)
        self.head = head_state(self.model)
        self.adapter_spec = state_spec(self.adapter)
        self.head_spec = state_spec(self.head)
        self.update_spec = update_spec(self.model)
        self.fingerprint = experiment_fingerprint(exp)
        from fairsplit.protocol.config import experiment_json

        self.experiment_json = experiment_json(exp)  # every request carries it (as the developer's loop)
        self.method = exp.method.name
        d = self.head["weight"].shape[1]  # last_layer's head refit carries the developer's basis
        k = min(getattr(exp.method, "dp_subspace_dim", 1), d)
        self.refit_basis = {"basis": torch.zeros(d, k), "mean": torch.zeros(d)}
        rng = np.random.default_rng(0)
        # Values do not change array sizes; a signal the shape of the adapter, random floats.
        self.signal = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)).to(v.dtype)
                       for i, (k, v) in enumerate(self.adapter.items())}
        names = group_names(auditor_cfg.data)
        n = 600  # a validation part's size; only the number of digits of n changes the bytes
        y = rng.integers(0, 2, n)
        s = np.array(names)[np.arange(n) % len(names)]
        scores = np.clip(0.5 * y + rng.random(n) * 0.6, 0, 1)
        from fairsplit.auditor.gate import released_report

        # as it crosses: under the auditor's DP without the per-group table
        self.report = released_report(fairness_report(y, scores, s, exp.threshold, 1),
                                      auditor_cfg.privacy.enabled)
        self.signal_metrics = {"n": getattr(exp.method, "auditor_batch_size", 64), "objective": float(rng.random()),
                               "sensitive_accuracy": float(rng.random()), "signal_norm": float(rng.random())}
        self._update = None

    @property
    def update(self) -> dict[str, torch.Tensor]:
        if self._update is None:
            self._update = {k: torch.zeros(s.shape, dtype=getattr(torch, s.dtype))
                            for k, s in self.update_spec.items()}
        return self._update

    def measure(self, round_: int, split: str, want: str) -> dict[str, int]:
        """Bytes of the request and of its reply, Flower's count and protobuf size."""
        from flwr.common.serde import recorddict_to_proto

        from fairsplit.protocol.codec import payload_nbytes
        from fairsplit.protocol.messages import PROTOCOL_VERSION, RoundRequest, make_reply, make_request, parse_reply

        req = RoundRequest(round=round_, split=split, want=want, method=self.method,
                           fingerprint=self.fingerprint, protocol=PROTOCOL_VERSION,
                           experiment=self.experiment_json)
        from fairsplit.protocol.messages import message_type_for
        from fairsplit.protocol.policy import REPLY, declared_records, sends_head

        request = make_request(self.adapter, self.head if sends_head(req) else None, req,
                               refit_basis=self.refit_basis if want == "head" else None)
        records = declared_records(message_type_for(req), REPLY, req)
        reply = make_reply(
            req,
            report=self.report if split != "none" else None,
            signal=self.signal if want == "signal" else None,
            head_signal=self.head if "head_signal" in records else None,
            head=self.head if "head" in records else None,
            update=self.update if want == "unlearning_update" else None,
            signal_metrics=self.signal_metrics if want != "none" else None,
            adapter_spec=self.adapter_spec, head_spec=self.head_spec,
        )
        parse_reply(reply, req, self.adapter_spec, self.update_spec, head_spec=self.head_spec)
        return {"to": payload_nbytes(request), "from": payload_nbytes(reply),
                "to_proto": recorddict_to_proto(request).ByteSize(),
                "from_proto": recorddict_to_proto(reply).ByteSize()}


def measure_model(run, ranks: list[int], signal_method: str, with_unlearning: bool = True) -> list[dict]:
    """One row per rank for the run file's experiment (weights not loaded)."""
    exp0 = run.experiment
    spec = exp0.model.model_copy(update={"pretrained": False})
    if spec.kind == "timm":
        from fairsplit.protocol.model import resolve_image_size

        label = f"{spec.name} ({resolve_image_size(spec)} px)"
    else:
        label = spec.name.split("/")[-1]
    rows = []
    for r in ranks:
        from fairsplit.protocol.model import build_model

        base = exp0.model_copy(update={"model": spec, "lora": exp0.lora.model_copy(update={"r": r})})

        def with_method(name: str):
            from fairsplit.protocol.methods import method_spec

            # the config's own method settings when it is that method (the request carries the
            # experiment, so its bytes depend on them)
            cfg = exp0.method if exp0.method.name == name else method_spec(name).config(name=name)
            return base.model_copy(update={"method": cfg})

        model = build_model(base)
        erm = _Messages(model, with_method("erm"), run.auditor)
        sig = _Messages(model, with_method(signal_method), run.auditor)
        floor = int(sum(v.numel() * v.element_size() for v in erm.adapter.values()))
        head = int(sum(v.numel() * v.element_size() for v in erm.head.values()))
        eval_erm = erm.measure(1, "val", "none")
        noeval_sig = sig.measure(1, "none", "signal")
        eval_sig = sig.measure(1, "val", "signal")
        row = {
            "model": label, "rank": r,
            "targets": len(erm.update_spec),
            "adapter_tensors": len(erm.adapter),
            "adapter_params": int(sum(v.numel() for v in erm.adapter.values())),
            "floor_bytes": floor, "head_bytes": head,
            "to_auditor_train_round": noeval_sig["to"],
            "to_auditor_eval_round": eval_erm["to"],
            "to_auditor_eval_round_proto": eval_erm["to_proto"],
            "from_auditor_erm_eval": eval_erm["from"],
            "from_auditor_signal": noeval_sig["from"],
            "from_auditor_signal_eval": eval_sig["from"],
            "from_auditor_signal_eval_proto": eval_sig["from_proto"],
        }
        row["ratio_to_auditor"] = row["to_auditor_eval_round"] / floor
        row["ratio_from_auditor_signal"] = row["from_auditor_signal_eval"] / floor
        for m, name in (("erm", "erm"), ("signal", signal_method)):
            msgs = erm if m == "erm" else sig
            plan = planned_requests(with_method(name))  # the schedule developer/loop.py sends
            sizes = [msgs.measure(*p) for p in plan]
            row[f"run_{m}_messages"] = len(plan)
            row[f"run_{m}_to"] = sum(s["to"] for s in sizes)
            row[f"run_{m}_from"] = sum(s["from"] for s in sizes)
        if with_unlearning and r == ranks[0]:  # dense ΔW_s: the same for every rank
            unl = _Messages(model, with_method("unlearning"), run.auditor)
            row["from_auditor_unlearning_once"] = unl.measure(0, "none", "unlearning_update")["from"]
            del unl
        rows.append(row)
        del erm, sig, model
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run file (model, LoRA, schedule)")
    ap.add_argument("--text-config", type=Path, default=DEFAULT_TEXT_CONFIG,
                    help="second run file measured the same way (default: the MiniLM example)")
    ap.add_argument("--no-text", action="store_true", help="skip --text-config")
    ap.add_argument("--ranks", default="4,8,16,32", help="comma-separated LoRA ranks")
    ap.add_argument("--signal-method", default="adversarial",
                    choices=[n for n, spec in METHODS.items() if "adapter_gradient" in spec.crosses])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (model building only)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)

    from fairsplit.deploy.config import load_run_file

    torch.set_num_threads(args.threads)
    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    if not ranks or min(ranks) < 1:
        ap.error("--ranks needs positive integers")
    configs = [args.config] + ([] if args.no_text or args.text_config is None else [args.text_config])
    t0 = time.perf_counter()
    rows = []
    for cfg in configs:
        run = load_run_file(cfg)
        rows += measure_model(run, ranks, args.signal_method)
    figure = max(r["ratio_to_auditor"] for r in rows)

    print(f"# bytes per round (Flower's record count, protocol.codec.payload_nbytes); signal method "
          f"{args.signal_method!r}; configs: " + ", ".join(
              f"{c.name} ({load_run_file(c).experiment.rounds} rounds, eval_every "
              f"{load_run_file(c).experiment.eval_every})" for c in configs))
    print_table(rows, [
        ("model", "model"), ("rank", "r"), ("adapter_params", "adapter params"),
        ("floor_bytes", "floor B"),
        ("to_auditor_train_round", "to auditor, signal round B"),
        ("to_auditor_eval_round", "to auditor, eval round B"),
        ("ratio_to_auditor", "to / floor"),
        ("from_auditor_erm_eval", "from auditor, ERM B"),
        ("from_auditor_signal", "from auditor, signal B"),
        ("from_auditor_signal_eval", "from auditor, signal+eval B"),
        ("ratio_from_auditor_signal", "signal+eval / floor"),
    ])
    print()
    print("# per run (every request of each config's schedule, as developer/loop.py sends them) "
          "and protobuf sizes")
    print_table(rows, [
        ("model", "model"), ("rank", "r"),
        ("run_erm_to", "ERM run to B"), ("run_erm_from", "ERM run from B"),
        ("run_signal_to", f"{args.signal_method} run to B"),
        ("run_signal_from", f"{args.signal_method} run from B"),
        ("to_auditor_eval_round_proto", "eval round to, protobuf B"),
        ("from_auditor_signal_eval_proto", "signal+eval from, protobuf B"),
    ])
    for r in rows:
        if "from_auditor_unlearning_once" in r:
            print(f"unlearning, {r['model']}: the round-0 reply carries dense ΔW_s for {r['targets']} "
                  f"target modules: {r['from_auditor_unlearning_once']:,} B once per run (any rank)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        write_json(args.json, {
            "command": "python bench/bytes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "configs": [str(c) for c in configs], "ranks": ranks, "signal_method": args.signal_method,
            "machine": machine_info(), "rows": rows, "bytes_ratio_to_floor": figure,
        })
    print(f"bytes_ratio_to_floor={figure:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
