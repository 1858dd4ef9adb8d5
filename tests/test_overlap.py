"""``overlap``: the developer trains round r+1 while the auditor answers round r.

Checks the schedule (round r+1 trains with the signal computed at the adapter of round r−1),
that overlap changes the result only through that staleness, and that a run interrupted with a
request in flight resumes to the uninterrupted result.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import Interrupted, make_run

from fairsplit.auditor.service import AuditorService
from fairsplit.deploy.colocated import DirectChannel, run_colocated
from fairsplit.developer.loop import run_experiment
from fairsplit.developer.trainer import DeveloperTrainer


class SpyTrainer(DeveloperTrainer):
    """Records, for each round, a fingerprint of the signal it trained with."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.used: list[float | None] = []

    def train_round(self, signal=None, head_signal=None):
        self.used.append(None if signal is None else float(sum(v.double().sum() for v in signal.values())))
        return super().train_round(signal, head_signal)


class LoggingChannel(DirectChannel):
    """Remembers the order of requests and the signal fingerprint of each reply."""

    def __init__(self, service):
        super().__init__(service)
        self.signals: dict[int, float] = {}

    def send(self, message_type, content):
        reply = super().send(message_type, content)
        if "signal" in reply:
            sig = reply["signal"].to_torch_state_dict()
            self.signals[int(content["config"]["round"])] = float(sum(v.double().sum() for v in sig.values()))
        return reply


def _run(tmp_path, overlap: bool, name: str):
    run = make_run("adversarial", tmp_path / f"{name}-state", tmp_path / "cache", rounds=4, overlap=overlap)
    trainer = SpyTrainer(run.experiment, run.developer)
    channel = LoggingChannel(AuditorService(run.experiment, run.auditor))
    res = run_experiment(run.experiment, run.developer, channel, tmp_path / name, "colocated",
                         trainer=trainer)
    return run, res, trainer.used, channel.signals


def test_overlap_uses_the_signal_one_round_staler(tmp_path):
    run_sync, res_sync, used_sync, sig_sync = _run(tmp_path, False, "sync")
    run_ovl, res_ovl, used_ovl, sig_ovl = _run(tmp_path, True, "overlap")
    # without overlap round r trains with the signal computed after round r-1 (at θ_{r-1})
    assert used_sync == [sig_sync[0], sig_sync[1], sig_sync[2], sig_sync[3]]
    # with overlap round r trains with the one computed at θ_{r-2} (round 1 and 2: round 0's)
    assert used_ovl == [sig_ovl[0], sig_ovl[0], sig_ovl[1], sig_ovl[2]]
    assert sig_ovl[0] == sig_sync[0] and sig_ovl[1] == sig_sync[1]  # same θ_0, θ_1 so far
    assert res_ovl["per_round"][2]["train_loss"] != res_sync["per_round"][2]["train_loss"]
    # every round still gets its validation report and its signal metrics, in round order
    rows = [json.loads(x) for x in (tmp_path / "overlap" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all("val" in r for r in rows[1:]) and all("signal" in r for r in rows[:4])
    # the same requests; each carries its experiment, which differs in one key ("overlap")
    from fairsplit.protocol.config import experiment_json

    extra = len(experiment_json(run_ovl.experiment)) - len(experiment_json(run_sync.experiment))
    requests = sum(1 for x in (tmp_path / "overlap" / "audit.jsonl").read_text().splitlines()
                   if json.loads(x)["direction"] == "sent")
    assert res_ovl["bytes_to_auditor"] - res_sync["bytes_to_auditor"] == requests * extra


@pytest.mark.parametrize("stop_after", [1, 2])
def test_overlap_run_interrupted_with_a_request_in_flight_resumes_identically(tmp_path, stop_after):
    run = make_run("adversarial", tmp_path / "ref-state", tmp_path / "cache", rounds=4, overlap=True)
    ref = run_colocated(run, tmp_path / "ref")

    run2 = make_run("adversarial", tmp_path / "state", tmp_path / "cache", rounds=4, overlap=True)

    def crash(row):
        if row["round"] == stop_after:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_colocated(run2, tmp_path / "out", on_round=crash)
    ckpt = torch.load(tmp_path / "out" / "checkpoint" / "checkpoint.pt", weights_only=False)
    assert ckpt["pending"] is not None  # round stop_after+1's request was in flight
    res = run_colocated(run2, tmp_path / "out", resume=True)
    assert res["metrics"] == ref["metrics"]
    assert [r["train_loss"] for r in res["per_round"]] == [r["train_loss"] for r in ref["per_round"]]
    a = load_file(str(tmp_path / "ref" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
