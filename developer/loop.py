"""The developer's round loop, independent of the transport.

Round r (1..R): K = ``local_steps`` steps on the task loss (plus the auditor's signal, if any);
then one request carries the adapter (and the head when validation is due) to the auditor, whose
reply holds the validation report and, for signal methods, the signal for round r+1. So one
message per round carries all the auditor's work. Before round 1 a round-0 request fetches the
first signal (signal methods) or the unlearning update. After round R a last request asks for the
test-split metrics.

The transport is an :class:`AuditorChannel`: Flower's Grid in deployment
(:mod:`developer.serverapp`), a direct call in the co-located runner. Both see the same
``RecordDict`` payloads, so bytes and checks are identical.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Protocol

from flwr.app import RecordDict

from protocol.codec import payload_digest
from protocol.config import SIGNAL_METHODS, DeveloperConfig, ExperimentConfig, experiment_fingerprint
from protocol.messages import PROTOCOL_VERSION, Reply, RoundRequest, make_request, message_type_for, parse_reply
from protocol.model import state_spec, update_spec

from .results import append_jsonl, atomic_write_json, save_final_model
from .trainer import DeveloperTrainer

__all__ = ["AuditorChannel", "AuditorError", "run_experiment"]

log = logging.getLogger(__name__)


class AuditorError(RuntimeError):
    """The auditor answered with an error, or did not answer in time."""


class AuditorChannel(Protocol):
    """Sends one request to the auditor and returns its reply's records."""

    def send(self, message_type: str, content: RecordDict) -> RecordDict:
        """Raises :class:`AuditorError` on an error reply or timeout."""
        ...


def _dataset_name(cfg: DeveloperConfig) -> str:
    return cfg.data.kind


def run_experiment(exp: ExperimentConfig, cfg: DeveloperConfig, channel: AuditorChannel,
                   out_dir: Path, transport: str,
                   on_round: Callable[[dict], None] | None = None,
                   trainer: DeveloperTrainer | None = None) -> dict:
    """Train for ``exp.rounds`` rounds against the auditor and write the run's outputs.

    Writes into ``out_dir``: ``metrics.jsonl`` (one line per round), ``audit.jsonl`` (one line
    per payload sent or received: message type, round, records and their keys, bytes, SHA-256;
    never values), ``results.json`` and ``model/`` (peft adapter + ``head.safetensors``).
    Returns the results dict.

    ``results.json`` keys: ``method``, ``dataset``, ``transport``, ``metrics`` (final test
    report), ``per_round``, ``rounds``, ``wall_time_s``, ``train_time_s``, ``channel_time_s``,
    ``bytes_to_auditor``, ``bytes_from_auditor``, ``fingerprint``, ``experiment``.

    Raises:
        AuditorError: the auditor refused a request or did not answer.
        protocol.codec.PayloadError: the auditor's reply violated the payload policy.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    audit_path = out_dir / "audit.jsonl"
    audit_path.unlink(missing_ok=True)
    t_start = time.perf_counter()
    trainer = trainer or DeveloperTrainer(exp, cfg)
    fingerprint = experiment_fingerprint(exp)
    method = exp.method.name
    adapter_contract = state_spec(trainer.adapter())
    update_contract = update_spec(trainer.model)
    sent = received = 0
    train_time = channel_time = 0.0
    per_round: list[dict] = []

    def ask(round_: int, split: str, want: str) -> Reply:
        nonlocal sent, received, channel_time
        req = RoundRequest(round=round_, split=split, want=want, method=method,
                           fingerprint=fingerprint, protocol=PROTOCOL_VERSION)
        content = make_request(trainer.adapter(), trainer.head() if split != "none" else None, req)
        mtype = message_type_for(req)
        out_digest = payload_digest(content)
        append_jsonl(audit_path, {"direction": "sent", "message_type": mtype, "round": round_, **out_digest})
        sent += out_digest["bytes"]
        t0 = time.perf_counter()
        reply = channel.send(mtype, content)
        channel_time += time.perf_counter() - t0
        in_digest = payload_digest(reply)
        append_jsonl(audit_path, {"direction": "received", "message_type": mtype, "round": round_, **in_digest})
        received += in_digest["bytes"]
        return parse_reply(reply, req, adapter_contract, update_contract)

    signal = None
    pre: dict = {}
    if method == "unlearning":
        rep = ask(0, "none", "unlearning_update")
        trainer.apply_unlearning(rep.update, exp.method.lam)
        pre = {"round": 0, "signal": rep.signal_metrics}
    elif method in SIGNAL_METHODS:
        rep = ask(0, "none", "signal")
        signal = rep.signal
        pre = {"round": 0, "signal": rep.signal_metrics}
    if pre:
        append_jsonl(metrics_path, pre)
        if on_round is not None:
            on_round(pre)

    for r in range(1, exp.rounds + 1):
        t0 = time.perf_counter()
        stats = trainer.train_round(signal)
        train_time += time.perf_counter() - t0
        row: dict = {"round": r, "step": trainer.step, **stats}
        evaluate = r % exp.eval_every == 0 or r == exp.rounds
        want = "signal" if method in SIGNAL_METHODS and r < exp.rounds else "none"
        if evaluate or want != "none":
            rep = ask(r, "val" if evaluate else "none", want)
            if rep.report is not None:
                row["val"] = rep.report
            if want == "signal":
                signal = rep.signal
                row["signal"] = rep.signal_metrics
        row["wall_time_s"] = time.perf_counter() - t_start
        append_jsonl(metrics_path, row)
        per_round.append(row)
        if on_round is not None:
            on_round(row)
        log.info("round %d/%d: %s", r, exp.rounds, {k: round(v, 4) for k, v in stats.items()})

    test = ask(exp.rounds, "test", "none").report
    save_final_model(trainer.model, out_dir)
    results = {
        "method": method,
        "lam": exp.method.lam,
        "dataset": _dataset_name(cfg),
        "transport": transport,
        "metrics": test,
        "per_round": per_round,
        "rounds": exp.rounds,
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_time,
        "channel_time_s": channel_time,
        "bytes_to_auditor": sent,
        "bytes_from_auditor": received,
        "fingerprint": fingerprint,
        "experiment": exp.model_dump(mode="json"),
    }
    atomic_write_json(out_dir / "results.json", results)
    return results
