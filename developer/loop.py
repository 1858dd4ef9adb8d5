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
from pathlib import Path
from typing import Callable

from fairsplit.developer.config import DeveloperConfig
from fairsplit.protocol.config import ExperimentConfig, experiment_fingerprint
from fairsplit.protocol.messages import Reply
from fairsplit.protocol.methods import method_spec, request_plan, total_rounds
from fairsplit.protocol.schedule import after_round, final_requests, round0_want

from .results import (
    CHECKPOINT_FILE,
    append_jsonl,
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
    write_jsonl,
)
from .client import AuditorChannel, AuditorClient, AuditorError
from .fairnet import CondStage
from .model_card import write_model_card
from .run_state import CHECKPOINT_FORMAT, CheckpointMismatch, RunState
from .trainer import DeveloperTrainer

__all__ = ["AuditorChannel", "AuditorError", "CHECKPOINT_FORMAT", "CheckpointMismatch", "STOP_FILE",
           "run_experiment"]

log = logging.getLogger(__name__)

#: A file whose presence in the run's folder ends the run before its next round (a study's
#: pruner; see :func:`run_experiment`).
STOP_FILE = "STOP"


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
    ``torch.save`` of :meth:`developer.run_state.RunState.to_checkpoint` (format 1: the round,
    the trainer's state, the auditor's pending signal or ΔW_s, FairNet's stage, every metrics
    row, byte and time totals, and with ``overlap`` the request in flight, sent again on
    resume). It is kept after the run.

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
    state = RunState.from_checkpoint(ckpt, fingerprint, str(ckpt_dir / CHECKPOINT_FILE)) if ckpt is not None else None
    if not resume:
        audit_path.unlink(missing_ok=True)
        (ckpt_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    t_start = time.perf_counter()
    trainer = trainer or DeveloperTrainer(exp, cfg)
    setup_time = time.perf_counter() - t_start
    stop_file = out_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    method = exp.method.name
    plan = request_plan(exp.method)  # which method's row governs which request
    lam = plan.lam
    # FairNet (gated methods): the detector and conditional LoRA, trained after round R
    stage = (CondStage(trainer.model, exp, trainer.data, trainer.device)
             if method_spec(method).gated else None)
    client = AuditorClient(exp, trainer, stage, channel, audit_path)
    last = total_rounds(exp)
    train_time = wall_offset = 0.0
    rows: list[dict] = []  # every metrics.jsonl line, round 0 included
    signal = head_signal = unlearning_update = cond_signal = None
    next_round = 0
    if state is not None:
        trainer.load_state_dict(state.trainer)
        if stage is not None:
            stage.load_state_dict(state.cond)
            cond_signal = state.cond_signal
        unlearning_update = state.unlearning_update
        if unlearning_update is not None:
            trainer.apply_unlearning(unlearning_update, lam)
        signal, head_signal = state.signal, state.head_signal
        rows = list(state.rows)
        client.sent, client.received = state.bytes_to_auditor, state.bytes_from_auditor
        train_time, client.channel_time = state.train_time_s, state.channel_time_s
        wall_offset = state.wall_time_s
        next_round = state.round + 1
        write_jsonl(metrics_path, rows)
        log.info("resuming after round %d from %s", next_round - 1, ckpt_dir)
    else:
        metrics_path.unlink(missing_ok=True)

    def elapsed() -> float:
        return wall_offset + time.perf_counter() - t_start

    def checkpoint(round_: int, pending: dict | None = None) -> None:
        save_checkpoint(ckpt_dir, RunState(
            fingerprint=fingerprint, round=round_, pending=pending, trainer=trainer.state_dict(),
            signal=signal, head_signal=head_signal, unlearning_update=unlearning_update,
            cond=stage.state_dict() if stage else None, cond_signal=cond_signal, rows=rows,
            bytes_to_auditor=client.sent, bytes_from_auditor=client.received, train_time_s=train_time,
            channel_time_s=client.channel_time, wall_time_s=elapsed()).to_checkpoint())

    submit, collect, ask = client.submit, client.collect, client.ask

    if next_round == 0:
        pre: dict = {}
        want0 = round0_want(exp)  # the request schedule: protocol.schedule
        if want0 == "unlearning_update":
            rep = ask(0, "none", "unlearning_update")
            unlearning_update = rep.update
            trainer.apply_unlearning(unlearning_update, lam)
            pre = {"round": 0, "signal": rep.signal_metrics}
        elif want0 == "signal":
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
    if state is not None and state.pending is not None:
        p = state.pending  # the request was sent (or about to be) when the developer stopped
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
        request = after_round(exp, r)
        split, want = request if request is not None else ("none", "none")
        if request is not None:
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
                "channel_time_s": client.channel_time, "bytes_to_auditor": client.sent,
                "bytes_from_auditor": client.received, "fingerprint": fingerprint,
                "experiment": exp.model_dump(mode="json")}

    if stopped_after is not None:  # pruned: no head refit, no test report, no final model
        results = summary(None, rows[-1].get("privacy") if rows else None, None)
        atomic_write_json(out_dir / "results.json", results)
        return results
    final = test_reply = None
    for split, want in final_requests(exp):
        rep = ask(last, split, want)
        if want == "head":  # the auditor refits the head on its data (last_layer)
            trainer.set_head(rep.head)
            final = rep.signal_metrics
        elif want == "threshold":  # the auditor chooses FairNet's τ on its validation part
            stage.set_tau(rep.signal_metrics["tau"])
            final = rep.signal_metrics
        elif split == "test":
            test_reply = rep
    save_final_model(trainer.model, out_dir, extra=None if stage is None else {
        "fairnet_cond_lora": stage.cond_state(), "fairnet_detector": stage.detector_state()})
    results = summary(test_reply.report, test_reply.privacy, final)
    write_model_card(out_dir / "model", exp, results)
    atomic_write_json(out_dir / "results.json", results)
    return results
