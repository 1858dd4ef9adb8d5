"""Crash, resume and re-send: a resumed run equals an uninterrupted one, the auditor answers a
re-sent round identically (also after a restart), and both parties' audit logs match line by line.

Demo-sized: a 1-block ViT on 300 synthetic examples, 3 rounds of 2 steps. LoRA dropout is on so
that the developer's torch RNG state has to be restored for the runs to agree.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file

from flower_helpers import TINY_VIT, method_table

from fairsplit.auditor.service import AuditorService, ProtocolMismatch, StateUnavailable
from fairsplit.deploy.colocated import DirectChannel, run_colocated
from fairsplit.developer.loop import AuditorError, CheckpointMismatch, run_experiment
from fairsplit.developer.results import load_checkpoint, save_checkpoint
from fairsplit.protocol import fileio
from fairsplit.protocol.codec import PayloadError, payload_digest
from fairsplit.deploy.config import RunFile
from fairsplit.protocol.config import parse_config
from fairsplit.protocol.model import build_model, lora_modules, subtract_weight_update

METHODS = ["erm", "adversarial", "unlearning"]
LAM = 0.5


def make_run(method: str, state_dir: Path | None, cache: Path, **experiment) -> RunFile:
    cfg = {
        "experiment": {
            "rounds": 3, "local_steps": 2, "batch_size": 16, "lr": 3e-3, "seed": 0,
            "model": TINY_VIT,
            "lora": {"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.1},
            "method": method_table(method, lam=LAM, auditor_batch_size=32, auditor_steps=5,
                                   sensitive_steps=4),
            **experiment,
        },
        # one thread: the tiny model gains nothing from more, and a shared machine loses a lot
        "developer": {"data": {"kind": "synthetic", "n": 300}, "cache_dir": str(cache), "num_threads": 1},
        "auditor": {"data": {"kind": "synthetic", "n": 300, "sensitive": True}, "num_threads": 1,
                    "cache_dir": str(cache), "state_dir": str(state_dir) if state_dir else None,
                    "privacy": {"enabled": False}},  # resume of exact replies; DP: tests/test_privacy.py
    }
    return parse_config(RunFile, cfg, "<test>")


class Interrupted(Exception):
    """Stands for the developer's process dying."""


class RecordingChannel(DirectChannel):
    """Direct channel that keeps every request and the digest of its reply."""

    def __init__(self, service):
        super().__init__(service)
        self.calls: list[tuple[str, RecordDict, str]] = []

    def send(self, message_type, content):
        reply = super().send(message_type, content)
        self.calls.append((message_type, content, payload_digest(reply)["sha256"]))
        return reply


class Reference:
    """An uninterrupted run: its outputs, its auditor service, and every request it sent."""

    def __init__(self, root: Path, method: str):
        self.out = root / "out"
        self.state_dir = root / "auditor_state"
        self.run = make_run(method, self.state_dir, root / "cache")
        self.service = AuditorService(self.run.experiment, self.run.auditor)
        self.channel = RecordingChannel(self.service)
        self.results = run_experiment(self.run.experiment, self.run.developer, self.channel,
                                      self.out, transport="colocated")
        # both logs as they stand after the run (later tests re-send requests to this auditor)
        self.logs = ((self.out / "audit.jsonl").read_text(), (self.state_dir / "audit.jsonl").read_text())

    def request(self, round_: int, want: str):
        """(message type, content, reply sha256) of the request for ``round_`` asking ``want``."""
        for mtype, content, sha in self.channel.calls:
            cfg = content["config"]
            if cfg["round"] == round_ and cfg["want"] == want:
                return mtype, content, sha
        raise KeyError((round_, want))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache: dict[str, Reference] = {}

    def get(method: str) -> Reference:
        if method not in cache:
            cache[method] = Reference(tmp_path_factory.mktemp(f"ref-{method}"), method)
        return cache[method]

    return get


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _without_wall(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_results(ref: Reference, out: Path, res: dict) -> None:
    for name in ("adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(str(ref.out / "model" / name)), load_file(str(out / "model" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}[{k}] differs"
    assert _json(res["metrics"]) == _json(ref.results["metrics"])
    assert [r["train_loss"] for r in res["per_round"]] == [r["train_loss"] for r in ref.results["per_round"]]
    assert _json(_without_wall(res["per_round"])) == _json(_without_wall(ref.results["per_round"]))
    for key in ("bytes_to_auditor", "bytes_from_auditor", "fingerprint"):
        assert res[key] == ref.results[key]
    # metrics.jsonl: every round exactly once, equal to the reference's
    assert _json(_without_wall(_read_jsonl(out / "metrics.jsonl"))) == _json(
        _without_wall(_read_jsonl(ref.out / "metrics.jsonl")))


def assert_audit_logs_match(developer_log: str, auditor_log: str) -> None:
    dev = [json.loads(line) for line in developer_log.splitlines()]
    aud = [json.loads(line) for line in auditor_log.splitlines()]
    assert len(dev) == len(aud) and dev
    flip = {"sent": "received", "received": "sent"}
    for d, a in zip(dev, aud):
        assert a["direction"] == flip[d["direction"]]
        for key in ("message_type", "round", "records", "bytes", "sha256"):
            assert d[key] == a[key], key
        assert "error" not in a and "time" in a and "time" in d


# -- (a) + (d): interrupted and resumed == uninterrupted; the two audit logs match ------------


@pytest.mark.parametrize("method", METHODS)
def test_interrupted_run_resumes_to_identical_results(method, reference, tmp_path):
    ref = reference(method)
    state_dir = tmp_path / "auditor_state"
    run = make_run(method, state_dir, tmp_path / "cache")
    out = tmp_path / "out"

    def crash(row):  # after round 1: the resumed auditor must compute round 2 from its state
        if row["round"] == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_colocated(run, out, on_round=crash)
    assert load_checkpoint(out / "checkpoint")["round"] == 1
    assert not (out / "results.json").exists()
    res = run_colocated(run, out, resume=True)  # a fresh AuditorService on the same state_dir
    assert_same_results(ref, out, res)
    assert load_checkpoint(out / "checkpoint")["round"] == 3  # kept after the run
    assert_audit_logs_match((out / "audit.jsonl").read_text(), (state_dir / "audit.jsonl").read_text())
    assert_audit_logs_match(*ref.logs)


def test_reply_lost_after_auditor_advanced_resends_round_and_matches(reference, tmp_path):
    """The auditor answered round 2 but the developer died before its checkpoint: the resumed
    developer re-sends round 2 to a restarted auditor that already holds round 2's state."""
    ref = reference("adversarial")
    run = make_run("adversarial", tmp_path / "auditor_state", tmp_path / "cache")
    out = tmp_path / "out"

    class LosingChannel(DirectChannel):
        def send(self, message_type, content):
            reply = super().send(message_type, content)
            if content["config"]["round"] == 2:
                raise AuditorError("connection lost")
            return reply

    service = AuditorService(run.experiment, run.auditor)
    with pytest.raises(AuditorError):
        run_experiment(run.experiment, run.developer, LosingChannel(service), out, "colocated")
    assert load_checkpoint(out / "checkpoint")["round"] == 1
    assert service.state_after(2) is not None  # the auditor did advance to round 2
    fresh = AuditorService(run.experiment, run.auditor)
    res = run_experiment(run.experiment, run.developer, DirectChannel(fresh), out, "colocated",
                         resume=True)
    assert_same_results(ref, out, res)


# -- (b), (c): re-sent rounds, restarted auditor ---------------------------------------------


@pytest.mark.parametrize("method", ["adversarial", "unlearning"])
def test_resent_round_is_answered_identically_after_later_rounds(method, reference):
    ref = reference(method)
    want = "signal" if method == "adversarial" else "unlearning_update"
    rounds = [0, 1, 2] if method == "adversarial" else [0]
    w_before = {n: m.get_base_layer().weight.clone() for n, m in lora_modules(ref.service.model).items()}
    for r in rounds:  # the service has answered every round, and the test request, since
        mtype, content, sha = ref.request(r, want)
        assert payload_digest(ref.service.handle(mtype, content))["sha256"] == sha
    mtype, content, sha = ref.request(ref.run.experiment.rounds, "none")  # last val, then test
    assert payload_digest(ref.service.handle(mtype, content))["sha256"] == sha
    if method == "unlearning":  # served again, but W0 − λ·ΔW_s is applied exactly once
        for n, m in lora_modules(ref.service.model).items():
            assert torch.equal(m.get_base_layer().weight, w_before[n])
        w0 = build_model(ref.run.experiment)
        update = load_checkpoint(ref.out / "checkpoint")["unlearning_update"]
        subtract_weight_update(w0, update, LAM)
        for n, m in lora_modules(w0).items():
            assert torch.equal(m.get_base_layer().weight, w_before[n])


@pytest.mark.parametrize("method", ["adversarial", "unlearning"])
def test_restarted_auditor_answers_like_the_original(method, reference):
    ref = reference(method)
    fresh = AuditorService(ref.run.experiment, ref.run.auditor)  # same state_dir, new process
    calls = ref.channel.calls
    for mtype, content, sha in reversed(calls):  # latest first: the state comes from disk
        assert payload_digest(fresh.handle(mtype, content))["sha256"] == sha


def test_in_memory_state_resend_and_discarded_state(reference, tmp_path):
    ref = reference("adversarial")
    run = make_run("adversarial", None, tmp_path / "cache")
    service = AuditorService(run.experiment, run.auditor)  # no state_dir: memory only
    for r in (0, 1, 2, 1, 0, 2):
        mtype, content, sha = ref.request(r, "signal")
        assert payload_digest(service.handle(mtype, content))["sha256"] == sha
    assert not list(tmp_path.glob("**/audit.jsonl"))
    # Flower's context.state as the store: a new service per message (one process per message)
    state = RecordDict()
    for r in (0, 1, 2, 1):
        mtype, content, sha = ref.request(r, "signal")
        once = AuditorService(run.experiment, run.auditor)
        assert payload_digest(once.handle(mtype, content, state))["sha256"] == sha
    # only the last round's snapshot kept: round 1 needs round 0's, which is gone
    short = AuditorService(run.experiment, run.auditor, keep_rounds=1)
    for r in (0, 1, 2):
        short.handle(*ref.request(r, "signal")[:2])
    with pytest.raises(StateUnavailable, match="round 0"):
        short.handle(*ref.request(1, "signal")[:2])
    # a restarted auditor without state_dir refuses rather than answer from an empty state
    with pytest.raises(StateUnavailable, match="no state from before round 2"):
        AuditorService(run.experiment, run.auditor).handle(*ref.request(2, "signal")[:2])


# -- (d) refused requests in the auditor's log -------------------------------------------------


def test_refused_request_is_logged_without_a_reply(reference, tmp_path):
    ref = reference("adversarial")
    run = make_run("adversarial", tmp_path / "auditor_state", tmp_path / "cache")
    service = AuditorService(run.experiment, run.auditor)
    mtype, content, _ = ref.request(1, "signal")
    with pytest.raises(ProtocolMismatch):
        service.handle("evaluate", content)  # wrong message type for a signal request
    with pytest.raises(PayloadError):
        service.handle("train", RecordDict())
    lines = _read_jsonl(tmp_path / "auditor_state" / "audit.jsonl")
    assert [(x["direction"], x["round"], x["error"]) for x in lines] == [
        ("received", 1, "ProtocolMismatch"), ("received", None, "PayloadError")]
    assert lines[0]["sha256"] == payload_digest(content)["sha256"]
    assert not service.data_loaded  # refused before any of the auditor's data was read


# -- (e) atomic checkpoints ---------------------------------------------------------------


def test_checkpoint_survives_a_crash_during_write(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, {"round": 1, "adapter": torch.arange(4.0)})
    (folder / ".checkpoint.pt.torn.tmp").write_bytes(b"\x80\x02half a pickle")  # a killed writer

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(folder, {"round": 2, "adapter": torch.zeros(4)})
    monkeypatch.undo()
    ckpt = load_checkpoint(folder)
    assert ckpt["round"] == 1 and torch.equal(ckpt["adapter"], torch.arange(4.0))
    assert sorted(p.name for p in folder.iterdir()) == [".checkpoint.pt.torn.tmp", "checkpoint.pt"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "a folder"])
def test_unreadable_checkpoint_is_named_with_what_to_do(tmp_path, damage):
    """--resume on a torn or corrupt checkpoint: an error naming the file, what is wrong with
    it and what to do, not torch's bare message ([Errno 22] Invalid argument, zip errors)."""
    folder = tmp_path / "checkpoint"
    path = save_checkpoint(folder, {"round": 1, "adapter": torch.arange(1000.0)})
    good = path.read_bytes()
    if damage == "a folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes({"truncated": good[: len(good) // 2], "empty": b"",
                          "garbage": b"not a checkpoint " * 8}[damage])
    with pytest.raises(ValueError) as info:
        load_checkpoint(folder)
    msg = str(info.value)
    assert str(path) in msg
    assert "--resume" in msg and "restore" in msg  # what the user can do


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch, failing):
    """ENOSPC while the new checkpoint is written: an error naming the file and saying the
    previous checkpoint is intact; it is byte-identical and no temp file is left behind."""
    folder = tmp_path / "checkpoint"
    path = save_checkpoint(folder, {"round": 1, "adapter": torch.arange(4.0)})
    before = path.read_bytes()
    real_write = os.write

    def full_disk(fd, *args):
        if failing == "write":  # the first bytes land, then the disk is full
            real_write(fd, bytes(args[0][:16]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, failing, full_disk)
    with pytest.raises(OSError) as info:
        save_checkpoint(folder, {"round": 2, "adapter": torch.zeros(4)})
    monkeypatch.undo()
    err = info.value
    assert err.errno == errno.ENOSPC
    assert str(path) in str(err) and "intact" in str(err) and "No space left" in str(err)
    assert path.read_bytes() == before
    assert [p.name for p in folder.iterdir()] == ["checkpoint.pt"]  # the temp file is removed
    assert load_checkpoint(folder)["round"] == 1


def test_crash_while_checkpointing_resumes_from_previous_round(reference, tmp_path, monkeypatch):
    ref = reference("erm")
    run = make_run("erm", tmp_path / "auditor_state", tmp_path / "cache")
    out = tmp_path / "out"
    real_replace = os.replace
    written = []

    def replace(src, dst):
        if Path(dst).name == "checkpoint.pt":
            if len(written) == 1:  # the round-2 checkpoint
                raise OSError("simulated crash")
            written.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        run_colocated(run, out, resume=True)  # no checkpoint yet: starts afresh
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint")["round"] == 1
    assert len(_read_jsonl(out / "metrics.jsonl")) == 2  # round 2's row was written, not checkpointed
    res = run_colocated(run, out, resume=True)
    assert_same_results(ref, out, res)  # metrics.jsonl rewritten: round 2 appears once


# -- (f) a checkpoint of another experiment ------------------------------------------------


def test_resume_refuses_checkpoint_of_another_experiment(reference, tmp_path):
    ref = reference("erm")
    other = make_run("erm", tmp_path / "auditor_state", tmp_path / "cache", lr=1e-3)
    before = (ref.out / "checkpoint" / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointMismatch, match="fingerprint"):
        run_colocated(other, ref.out, resume=True)
    assert (ref.out / "checkpoint" / "checkpoint.pt").read_bytes() == before
