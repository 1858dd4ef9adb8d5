"""The developer's round loop, independent of the transport.

Round r (1..R): K = ``local_steps`` steps on the task loss (plus the auditor's signal, if any);
then one request carries the adapter (and the head when validation is due) to the auditor, whose
reply holds the validation report and, for signal methods, the signal for round r+1. So one
message per round carries all the auditor's work. Before round 1 a round-0 request fetches the
first signal (signal methods) or the unlearning update. After round R a last request asks for the
test-split metrics.

A gated method (FairNet, :mod:`developer.fairnet`) continues after round R: the developer trains
its bias detector on its own data, then rounds R + 1 .. R + ``cond_rounds`` train the conditional
LoRA only (with the auditor's ``cond_signal`` for ``fairnet``); every request carries the gated
model (``cond_adapter``, ``detector``), and after the last round the auditor chooses τ.

The transport is an :class:`AuditorChannel`: Flower's Grid in deployment
(:mod:`developer.serverapp`), a direct call in the co-located runner. Both see the same
``RecordDict`` payloads, so bytes and checks are identical.

After round 0 (when there is one) and after every round the loop writes a checkpoint,
``out_dir/checkpoint/checkpoint.pt``, replaced atomically; ``run_experiment(..., resume=True)``
continues from it with results identical to an uninterrupted run (see :func:`run_experiment`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from flwr.app import RecordDict

from fairsplit.protocol.codec import payload_digest
from fairsplit.developer.config import DeveloperConfig
from fairsplit.protocol.config import ExperimentConfig, experiment_fingerprint, experiment_json
from fairsplit.protocol.messages import PROTOCOL_VERSION, Reply, RoundRequest, make_request, message_type_for, parse_reply
from fairsplit.protocol.policy import sends_head
from fairsplit.protocol.methods import method_spec, request_plan, total_rounds
from fairsplit.protocol.model import state_spec, update_spec

from .results import (
    CHECKPOINT_FILE,
    append_jsonl,
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
    write_jsonl,
)
from .fairnet import CondStage
from .model_card import write_model_card
from .trainer import DeveloperTrainer

__all__ = ["AuditorChannel", "AuditorError", "CHECKPOINT_FORMAT", "CheckpointMismatch", "STOP_FILE",
           "run_experiment"]

log = logging.getLogger(__name__)

#: Version of the checkpoint's layout (see :func:`run_experiment`).
CHECKPOINT_FORMAT = 1
#: A file whose presence in the run's folder ends the run before its next round (a study's
#: pruner; see :func:`run_experiment`).
STOP_FILE = "STOP"


class AuditorError(RuntimeError):
    """The auditor answered with an error, or did not answer in time."""


class CheckpointMismatch(ValueError):
    """The checkpoint to resume from was written for another experiment (or checkpoint format)."""


def _now() -> str:
    """UTC wall-clock time for audit lines (ISO 8601, milliseconds); same format as the auditor's."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AuditorChannel(Protocol):
    """Sends one request to the auditor and returns its reply's records.

    A channel may also offer ``submit(message_type, content) -> handle`` and
    ``receive(handle) -> RecordDict`` to send without waiting (used with ``overlap``); without
    them the request is sent when its reply is collected.
    """

    def send(self, message_type: str, content: RecordDict) -> RecordDict:
        """Raises :class:`AuditorError` on an error reply or timeout."""
        ...


def _dataset_name(cfg: DeveloperConfig) -> str:
    return cfg.data.kind


def run_experiment(exp: ExperimentConfig, cfg: DeveloperConfig, channel: AuditorChannel,
                   out_dir: Path, transport: str,
                   on_round: Callable[[dict], None] | None = None,
                   trainer: DeveloperTrainer | None = None,
                   resume: bool = False) -> dict:
    """Train for ``exp.rounds`` rounds against the auditor and write the run's outputs.

    Writes into ``out_dir``: ``metrics.jsonl`` (one line per round), ``audit.jsonl`` (one line
    per payload sent or received: ``direction``, ``message_type``, ``round``, ``records`` with
    their keys and bytes, ``bytes``, ``sha256``, ``time``; never values), ``results.json``,
    ``model/`` (peft adapter + ``head.safetensors`` + ``README.md``, a Hugging Face model card
    with the auditor's test metrics, :mod:`developer.model_card`) and ``checkpoint/checkpoint.pt``.
    Returns the results dict.

    ``results.json`` keys: ``method``, ``dataset``, ``transport``, ``metrics`` (final test
    report), ``privacy`` (the test reply's :class:`protocol.privacy.PrivacyStatus`: ε this
    experiment is charged and the developer's total; each per-round row has its reply's too),
    ``per_round``, ``rounds``, ``wall_time_s``, ``setup_time_s`` (model build and data load),
    ``train_time_s``, ``channel_time_s``, ``bytes_to_auditor``, ``bytes_from_auditor``,
    ``fingerprint``, ``experiment``, ``stopped_after_round``.

    Stopping early: when the file ``out_dir/STOP`` (:data:`STOP_FILE`) appears, the run ends
    before its next round (after collecting a request in flight): no further request, no test
    report; ``results.json`` then has ``metrics = None`` and ``stopped_after_round`` = the last
    round completed (a study's pruner uses this; otherwise it is None). The file is removed
    when a run starts.

    Checkpoint: after the round-0 fetch (signal and unlearning methods) and after every round,
    ``checkpoint/checkpoint.pt`` is replaced atomically (temp file, fsync, ``os.replace``) with a
    ``torch.save`` of ``{"format": 1, "fingerprint", "round"`` (last completed round)``,
    "trainer"`` (:meth:`DeveloperTrainer.state_dict`: adapter, head, optimizer, batch-order RNG,
    permutation, position, step, torch RNG)``, "signal"`` (the auditor's signal for the next
    round, or None)``, "unlearning_update"`` (ΔW_s, or None)``, "cond"`` (FairNet:
    :meth:`developer.fairnet.CondStage.state_dict`, else None)``, "cond_signal"``, "rows"`` (every metrics.jsonl
    line so far)``, "bytes_to_auditor", "bytes_from_auditor", "train_time_s", "channel_time_s",
    "wall_time_s", "pending"}`` (with ``overlap``: round r's request in flight and its
    unfinished metrics row; it is sent again on resume). It is kept after the run.

    Args:
        resume: continue from ``out_dir/checkpoint`` if there is one: rebuild the model (and
            re-apply W0 − λ·ΔW_s for unlearning), restore the state above, rewrite
            ``metrics.jsonl`` from the checkpoint's rows, keep appending to ``audit.jsonl``, and
            go on with the next round; results equal those of an uninterrupted run except the
            time fields. Without a checkpoint the run starts from round 0 (``audit.jsonl`` is
            still kept). ``resume=False`` starts afresh, removing the old log and checkpoint.

    Raises:
        CheckpointMismatch: ``resume`` and the checkpoint's experiment fingerprint (or format)
            differs from this experiment's.
        developer.results.CheckpointUnreadable: ``resume`` and the checkpoint is truncated,
            corrupt or unreadable (the message names the file).
        developer.results.CheckpointWriteError: a checkpoint could not be written (e.g. a full
            disk); the previous one is intact.
        AuditorError: the auditor refused a request or did not answer.
        protocol.codec.PayloadError: the auditor's reply violated the payload policy.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    audit_path = out_dir / "audit.jsonl"
    ckpt_dir = out_dir / "checkpoint"
    fingerprint = experiment_fingerprint(exp)
    ckpt = load_checkpoint(ckpt_dir) if resume else None
    if ckpt is not None and ckpt.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"cannot resume from {ckpt_dir / CHECKPOINT_FILE}: it was written for experiment "
            f"fingerprint {str(ckpt.get('fingerprint'))[:12]}, this experiment's fingerprint is "
            f"{fingerprint[:12]} (the [experiment] table differs); start afresh without resume "
            "or use another output folder")
    if ckpt is not None and ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatch(f"checkpoint format {ckpt.get('format')!r} != {CHECKPOINT_FORMAT}")
    if not resume:
        audit_path.unlink(missing_ok=True)
        (ckpt_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    t_start = time.perf_counter()
    trainer = trainer or DeveloperTrainer(exp, cfg)
    setup_time = time.perf_counter() - t_start
    exp_json = experiment_json(exp)
    stop_file = out_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    method = exp.method.name
    plan = request_plan(exp.method)  # what to ask for when, and which method's row governs it
    lam = plan.lam
    adapter_contract = state_spec(trainer.adapter())
    head_contract = state_spec(trainer.head())
    update_contract = update_spec(trainer.model)
    # FairNet (gated methods): the detector and conditional LoRA, trained after round R
    stage = (CondStage(trainer.model, exp, trainer.data, trainer.device)
             if method_spec(method).gated else None)
    cond_contract, detector_contract = stage.gated.contracts() if stage else (None, None)
    last = total_rounds(exp)
    sent = received = 0
    train_time = channel_time = wall_offset = 0.0
    rows: list[dict] = []  # every metrics.jsonl line, round 0 included
    signal = head_signal = unlearning_update = cond_signal = None
    next_round = 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt["trainer"])
        if stage is not None:
            stage.load_state_dict(ckpt["cond"])
            cond_signal = ckpt.get("cond_signal")
        unlearning_update = ckpt["unlearning_update"]
        if unlearning_update is not None:
            trainer.apply_unlearning(unlearning_update, lam)
        signal, head_signal = ckpt["signal"], ckpt.get("head_signal")
        rows = list(ckpt["rows"])
        sent, received = int(ckpt["bytes_to_auditor"]), int(ckpt["bytes_from_auditor"])
        train_time, channel_time = float(ckpt["train_time_s"]), float(ckpt["channel_time_s"])
        wall_offset = float(ckpt["wall_time_s"])
        next_round = int(ckpt["round"]) + 1
        write_jsonl(metrics_path, rows)
        log.info("resuming after round %d from %s", next_round - 1, ckpt_dir)
    else:
        metrics_path.unlink(missing_ok=True)

    def elapsed() -> float:
        return wall_offset + time.perf_counter() - t_start

    def checkpoint(round_: int, pending: dict | None = None) -> None:
        save_checkpoint(ckpt_dir, {
            "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "round": round_,
            "pending": pending,
            "trainer": trainer.state_dict(), "signal": signal, "head_signal": head_signal,
            "unlearning_update": unlearning_update,
            "cond": stage.state_dict() if stage else None, "cond_signal": cond_signal,
            "rows": rows, "bytes_to_auditor": sent, "bytes_from_auditor": received,
            "train_time_s": train_time, "channel_time_s": channel_time, "wall_time_s": elapsed(),
        })

    def submit(round_: int, split: str, want: str) -> tuple:
        """Send round ``round_``'s request; returns a pending handle for :func:`collect`."""
        nonlocal sent, channel_time
        req = RoundRequest(round=round_, split=split, want=want, method=method, stage=plan.stage[want],
                           fingerprint=fingerprint, protocol=PROTOCOL_VERSION, experiment=exp_json)
        content = make_request(trainer.adapter(), trainer.head() if sends_head(req) else None, req,
                               adapter_spec=adapter_contract, head_spec=head_contract,
                               cond_adapter=stage.cond_state() if stage else None,
                               detector=stage.detector_state() if stage else None,
                               cond_spec=cond_contract, detector_spec=detector_contract)
        mtype = message_type_for(req)
        out_digest = payload_digest(content)
        append_jsonl(audit_path, {"direction": "sent", "message_type": mtype, "round": round_,
                                  **out_digest, "time": _now()})
        sent += out_digest["bytes"]
        t0 = time.perf_counter()
        if hasattr(channel, "submit"):
            handle = channel.submit(mtype, content)
            fetch = lambda: channel.receive(handle)  # noqa: E731
        else:
            fetch = lambda: channel.send(mtype, content)  # noqa: E731
        channel_time += time.perf_counter() - t0
        return req, mtype, fetch

    def collect(pending: tuple) -> Reply:
        """Wait for a submitted request's reply; log and check it."""
        nonlocal received, channel_time
        req, mtype, fetch = pending
        t0 = time.perf_counter()
        reply = fetch()
        channel_time += time.perf_counter() - t0
        in_digest = payload_digest(reply)
        append_jsonl(audit_path, {"direction": "received", "message_type": mtype, "round": req.round,
                                  **in_digest, "time": _now()})
        received += in_digest["bytes"]
        return parse_reply(reply, req, adapter_contract, update_contract, head_spec=head_contract,
                           cond_spec=cond_contract)

    def ask(round_: int, split: str, want: str) -> Reply:
        return collect(submit(round_, split, want))

    if next_round == 0:
        pre: dict = {}
        if plan.round0_want == "unlearning_update":
            rep = ask(0, "none", "unlearning_update")
            unlearning_update = rep.update
            trainer.apply_unlearning(unlearning_update, lam)
            pre = {"round": 0, "signal": rep.signal_metrics}
        elif plan.round0_want == "signal":
            rep = ask(0, "none", "signal")
            signal, head_signal = rep.signal, rep.head_signal
            pre = {"round": 0, "signal": rep.signal_metrics}
        if pre:
            rows.append(pre)
            append_jsonl(metrics_path, pre)
            checkpoint(0)
            if on_round is not None:
                on_round(pre)
        next_round = 1

    def finish(row: dict, rep: Reply | None, want: str) -> None:
        """Complete a round's metrics row with its reply (if any) and publish it."""
        nonlocal signal, head_signal, cond_signal
        if rep is not None and rep.report is not None:
            row["val"] = rep.report
        if rep is not None and want == "signal":
            signal, head_signal, cond_signal = rep.signal, rep.head_signal, rep.cond_signal
            row["signal"] = rep.signal_metrics
        if rep is not None and rep.privacy is not None:
            row["privacy"] = rep.privacy
        row["wall_time_s"] = elapsed()
        rows.append(row)
        append_jsonl(metrics_path, row)
        published.append(row)  # on_round is called once the round's checkpoint is written

    # overlap: at most one request in flight; its row is completed when its reply is collected
    pending = pending_row = pending_want = None
    published: list[dict] = []
    if ckpt is not None and ckpt.get("pending") is not None:
        p = ckpt["pending"]  # the request was sent (or about to be) when the developer stopped
        pending, pending_row, pending_want = submit(p["round"], p["split"], p["want"]), p["row"], p["want"]

    stopped_after = None
    for r in range(next_round, last + 1):
        if stop_file.exists():  # a study pruned this trial: end here, without the test report
            if pending is not None:
                finish(pending_row, collect(pending), pending_want)
                pending = None
                while published and on_round is not None:
                    on_round(published.pop(0))
            stopped_after = r - 1
            log.info("stopped after round %d (%s)", stopped_after, stop_file.name)
            break
        t0 = time.perf_counter()
        if r <= exp.rounds:
            stats = trainer.train_round(signal, head_signal)
        else:  # FairNet's conditional rounds: φ_c only
            stats = stage.train_round(cond_signal)
        if stage is not None and r == exp.rounds and not stage.detector_trained:
            stats.update(stage.train_detector())  # stage 2, on the developer's data alone
        train_time += time.perf_counter() - t0
        row: dict = {"round": r, "step": trainer.step, **stats}
        if pending is not None:  # overlap: round r-1's reply, its signal is used from round r+1
            finish(pending_row, collect(pending), pending_want)
            pending = pending_row = pending_want = None
        evaluate = r % exp.eval_every == 0 or r == last
        want = plan.want_after(r, exp.rounds)
        split = "val" if evaluate else "none"
        if evaluate or want != "none":
            handle = submit(r, split, want)
            if exp.overlap and r < last:
                pending, pending_row, pending_want = handle, row, want
            else:
                finish(row, collect(handle), want)
        else:
            finish(row, None, want)
        checkpoint(r, None if pending is None else
                   {"round": r, "split": split, "want": want, "row": pending_row})
        while published and on_round is not None:
            on_round(published.pop(0))
        log.info("round %d/%d: %s", r, last, {k: round(v, 4) for k, v in stats.items()})

    def summary(metrics, privacy, final) -> dict:
        """results.json (see above)."""
        return {"method": method, "lam": lam, "final": final, "dataset": _dataset_name(cfg),
                "transport": transport, "metrics": metrics, "privacy": privacy,
                "per_round": [row for row in rows if row["round"] >= 1], "rounds": exp.rounds,
                "wall_time_s": elapsed(), "setup_time_s": setup_time,
                "stopped_after_round": stopped_after, "train_time_s": train_time,
                "channel_time_s": channel_time, "bytes_to_auditor": sent,
                "bytes_from_auditor": received, "fingerprint": fingerprint,
                "experiment": exp.model_dump(mode="json")}

    if stopped_after is not None:  # pruned: no head refit, no test report, no final model
        results = summary(None, rows[-1].get("privacy") if rows else None, None)
        atomic_write_json(out_dir / "results.json", results)
        return results
    final = None
    if plan.final_want == "head":  # the auditor refits the head on its data (last_layer)
        rep = ask(last, "none", "head")
        trainer.set_head(rep.head)
        final = rep.signal_metrics
    elif plan.final_want == "threshold":  # the auditor chooses FairNet's τ on its validation part
        rep = ask(last, "none", "threshold")
        stage.set_tau(rep.signal_metrics["tau"])
        final = rep.signal_metrics
    test_reply = ask(last, "test", "none")
    save_final_model(trainer.model, out_dir, extra=None if stage is None else {
        "fairnet_cond_lora": stage.cond_state(), "fairnet_detector": stage.detector_state()})
    results = summary(test_reply.report, test_reply.privacy, final)
    write_model_card(out_dir / "model", exp, results)
    atomic_write_json(out_dir / "results.json", results)
    return results
