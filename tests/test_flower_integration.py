"""Integration: real flower-superlink / flower-supernode processes on loopback.

Tiny ViT + synthetic data, two rounds. Checks results.json, that the split run equals the
co-located reference run, that an auditor refusal reaches the developer with its reason, and that
every process is stopped afterwards (also after a failure).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flower_helpers import port_closed as _port_closed
from flower_helpers import processes_mentioning as _processes_mentioning
from flower_helpers import tiny_run, wait_gone

from fairsplit.deploy.colocated import run_colocated
from fairsplit.deploy.flower import FlowerError, free_port
from fairsplit.deploy.launch import run_local
from fairsplit.protocol.metrics import REPORT_KEYS

pytestmark = pytest.mark.flower

RESULT_KEYS = {"method", "dataset", "metrics", "per_round", "rounds", "wall_time_s",
               "bytes_to_auditor", "bytes_from_auditor"}


@pytest.fixture(autouse=True)
def _flwr_env(flwr_env):
    """Every test here starts real Flower processes (conftest's ``flwr_env``)."""


@pytest.mark.parametrize("method", ["erm", "unlearning", "adversarial", "orthogonality", "entropy"])
def test_two_rounds_over_flower_match_colocated(tmp_path, method):
    run = tiny_run(method, private=False)  # exact releases: Flower and co-located bit-identical
    port = free_port()
    rows = []
    res = run_local(run, tmp_path / "split", on_round=rows.append, timeout=600, port=port)

    # results.json as documented
    on_disk = json.loads((tmp_path / "split" / "results.json").read_text())
    assert RESULT_KEYS <= set(on_disk)
    assert on_disk["rounds"] == 2 and len(on_disk["per_round"]) == 2
    assert on_disk["method"] == method
    assert set(REPORT_KEYS) <= set(on_disk["metrics"]) and "per_group" in on_disk["metrics"]
    assert on_disk["metrics"]["n"] == 90  # 15% of 600 examples in auditor_test
    assert on_disk["bytes_to_auditor"] > 0 and on_disk["bytes_from_auditor"] > 0
    # progress callback saw each round (round 0: the signal/update fetched before training)
    assert [r["round"] for r in rows] == ([0, 1, 2] if method != "erm" else [1, 2])
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(x)["round"] for x in lines]
    assert rounds == ([0, 1, 2] if method != "erm" else [1, 2])  # round 0: signal/update fetch
    assert (tmp_path / "split" / "model" / "adapter_model.safetensors").exists()
    assert (tmp_path / "split" / "model" / "head.safetensors").exists()

    # the replies that actually crossed Flower carried only the declared records
    audit = [json.loads(x) for x in (tmp_path / "split" / "audit.jsonl").read_text().splitlines()]
    adapter_keys = set(load_file(str(tmp_path / "split" / "model" / "adapter_model.safetensors")))
    received = [a for a in audit if a["direction"] == "received"]
    assert len(received) == len([a for a in audit if a["direction"] == "sent"]) == len(rows) + 1
    for a in received:
        recs = a["records"]
        allowed = {"report", "signal", "update", "signal_metrics", "privacy"}
        assert set(recs) <= allowed, recs
        for name in ("report", "signal_metrics", "privacy"):
            if name in recs:
                assert recs[name]["kind"] == "ConfigRecord" and recs[name]["keys"] == ["json"]
        if "signal" in recs:
            assert set(recs["signal"]["keys"]) == adapter_keys  # exactly the adapter, nothing else
        assert a["sha256"] and a["bytes"] > 0
    if method in ("adversarial", "orthogonality", "entropy"):
        assert sum("signal" in a["records"] for a in received) == 2  # rounds 0 and 1
    if method == "unlearning":
        assert sum("update" in a["records"] for a in received) == 1

    # the privacy split changes who computes what, nothing else (for the signal methods this
    # also checks that the auditor's state survives between messages in Flower's context.state)
    ref = run_colocated(run, tmp_path / "colocated")
    assert res["metrics"] == ref["metrics"]
    assert res["bytes_to_auditor"] == ref["bytes_to_auditor"]
    a = load_file(str(tmp_path / "split" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "colocated" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    # every process is gone
    assert _port_closed(port)
    assert wait_gone(str(tmp_path)) == []


def test_auditor_refusal_reaches_developer_and_processes_stop(tmp_path):
    # 90 examples per evaluation split: a minimum group size of 1000 must be refused.
    # The reply carries the fixed code and text of the error class, never the group sizes.
    run = tiny_run(min_group_size=1000)
    port = free_port()
    with pytest.raises(FlowerError, match="E_SMALL_GROUP: an evaluation part") as err:
        run_local(run, tmp_path / "split", timeout=600, port=port)
    assert "1000" not in str(err.value).split("E_SMALL_GROUP")[1]
    assert not (tmp_path / "split" / "results.json").exists()
    # the auditor's own log has the detail, from its start-up check: each group, its size, a fix
    executor_log = (tmp_path / "split" / "logs" / "executor.log").read_text()
    assert "below min_group_size=1000" in executor_log and "group_map" in executor_log
    assert "'group_a': " in executor_log
    assert _port_closed(port)
    assert wait_gone(str(tmp_path)) == []


def test_request_over_the_privacy_budget_is_refused_over_flower(tmp_path):
    """A run whose planned releases exceed epsilon_budget is refused at its first request, with
    the budget and what is spent, before any release; nothing is charged."""
    run = tiny_run(rounds=1, state_dir=str(tmp_path / "auditor-state"),
                   privacy={"calibrate": False, "noise_multiplier": 0.5,
                            "report_noise_multiplier": 0.5, "epsilon_budget": 1.0})
    port = free_port()
    with pytest.raises(FlowerError, match=r"E_BUDGET: this run's planned releases would spend the "
                                          r"privacy budget: epsilon_budget = 1 \(delta = 1e-05\), spent 0.000"):
        run_local(run, tmp_path / "split", timeout=600, port=port)
    ledger = json.loads((tmp_path / "auditor-state" / "privacy_ledger.json").read_text()) \
        if (tmp_path / "auditor-state" / "privacy_ledger.json").exists() else {"events": []}
    assert ledger["events"] == []
    assert _port_closed(port)


def test_separate_party_commands(tmp_path):
    """`fairsplit auditor` and `fairsplit developer` as two OS processes, each with its own file,
    over TLS with SuperNode authentication; each party holds only its own credentials. The
    developer runs two configs one after another on its one SuperLink (the second a seed the
    auditor's [tune] table admits); the auditor just keeps answering. Its file names no
    state_dir (as examples/two-party/auditor.toml): its ledger lives in the default folder for
    the SuperLink it dials, survives it, and a deleted ledger stops the next start."""
    import signal
    import subprocess
    import sys

    from fairsplit.deploy.certs import generate
    from fairsplit.deploy.launch import _dump_toml, write_party_files
    from fairsplit.protocol.tune import TuneConfig

    from fairsplit.auditor.host import AuditorHost
    from fairsplit.auditor.state import PrivacyStateError, default_state_dir

    run = tiny_run(rounds=1)
    run = run.model_copy(update={"tune": TuneConfig.model_validate({"space": {"seeds": [1]}})})
    dev_cfg, aud_cfg = write_party_files(run, tmp_path / "cfg")
    second = run.developer_file().model_copy(update={"experiment": run.experiment.model_copy(update={"seed": 1})})
    dev_cfg2 = _dump_toml(second, tmp_path / "cfg" / "developer-seed1.toml")
    assert "[auditor" not in dev_cfg.read_text() and "sensitive = true" not in dev_cfg.read_text()
    dev_certs = generate(tmp_path / "developer-certs", only="superlink")
    aud_keys = generate(tmp_path / "auditor-keys", only="supernode")
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FAIRSPLIT_STATE_HOME": str(tmp_path / "state-home")}
    os.environ["FAIRSPLIT_STATE_HOME"] = env["FAIRSPLIT_STATE_HOME"]  # restored by the autouse fixture
    state = default_state_dir(f"127.0.0.1:{port}")
    assert state.parent.parent == tmp_path / "state-home"
    auditor = subprocess.Popen(
        [sys.executable, "-m", "fairsplit.deploy.cli", "auditor", "--config", str(aud_cfg),
         "--superlink", f"127.0.0.1:{port}", "--logs", str(tmp_path / "auditor-logs"),
         "--root-certificates", str(dev_certs["ca"]), "--auth-key", str(aud_keys["supernode_key"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dev = subprocess.run(
            [sys.executable, "-m", "fairsplit.deploy.cli", "developer", "--config", str(dev_cfg),
             "--config", str(dev_cfg2), "--port", str(port), "--out", str(tmp_path / "dev-out"),
             "--certs", str(tmp_path / "developer-certs"),
             "--auditor-key", str(aud_keys["supernode_pub"])],
            env=env, capture_output=True, text=True, timeout=600)
        assert dev.returncode == 0, dev.stdout + dev.stderr
        outs = [tmp_path / "dev-out" / "0-developer", tmp_path / "dev-out" / "1-developer-seed1"]
        res = [json.loads((o / "results.json").read_text()) for o in outs]
        assert [r["transport"] for r in res] == ["flower", "flower"] and res[0]["rounds"] == 1
        assert [r["experiment"]["seed"] for r in res] == [0, 1]
        assert auditor.poll() is None  # the auditor serves until it is stopped
        assert "--insecure" not in (tmp_path / "dev-out" / "logs" / "superlink.log").read_text()
    finally:
        os.killpg(auditor.pid, signal.SIGTERM)
        auditor.wait(timeout=30)
    assert wait_gone(str(tmp_path)) == []
    assert _port_closed(port)
    runs = json.loads((state / "runs.json").read_text())
    assert [r["fingerprint"] for r in runs["runs"]] == [r["fingerprint"] for r in res]  # two Flower runs
    # a restarted auditor reads the same ledger: the budget spent is not forgotten
    restarted = AuditorHost(run.experiment, run.auditor.model_copy(update={"state_dir": state}), run.tune)
    assert res[1]["privacy"]["epsilon_total"] > 0
    assert restarted.shared.ledger.epsilon() == pytest.approx(res[1]["privacy"]["epsilon_total"], rel=1e-6)
    (state / "privacy_ledger.json").unlink()
    with pytest.raises(PrivacyStateError, match="privacy_ledger.json"):
        AuditorHost(run.experiment, run.auditor.model_copy(update={"state_dir": state}), run.tune)
    refused = subprocess.run(
        [sys.executable, "-m", "fairsplit.deploy.cli", "auditor", "--config", str(aud_cfg),
         "--superlink", f"127.0.0.1:{port}", "--logs", str(tmp_path / "auditor-logs"),
         "--root-certificates", str(dev_certs["ca"]), "--auth-key", str(aud_keys["supernode_key"])],
        env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "privacy_ledger.json" in refused.stdout + refused.stderr

    # both audit logs list the same payloads (type, round, bytes, SHA-256), in the same order
    def lines(paths, direction):
        rows = [json.loads(x) for path in paths for x in path.read_text().splitlines() if x.strip()]
        return [(r["message_type"], r["round"], r["bytes"], r["sha256"]) for r in rows
                if r["direction"] == direction]
    dev_logs, aud_log = [o / "audit.jsonl" for o in outs], [state / "audit.jsonl"]
    assert lines(dev_logs, "sent") == lines(aud_log, "received") != []
    assert lines(dev_logs, "received") == lines(aud_log, "sent") != []


def test_overlap_over_flower_matches_colocated(tmp_path):
    """With overlap the ServerApp keeps one request in flight while it trains; same result."""
    run = tiny_run("adversarial", rounds=3, private=False)  # exact releases: bit-identical
    run.experiment.overlap = True
    res = run_local(run, tmp_path / "split", timeout=600)
    ref = run_colocated(run, tmp_path / "colocated")
    assert res["metrics"] == ref["metrics"]
    assert [r["train_loss"] for r in res["per_round"]] == [r["train_loss"] for r in ref["per_round"]]
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert wait_gone(str(tmp_path)) == []


def test_fairnet_two_rounds_over_flower_match_colocated(tmp_path):
    """FairNet over the real deployment: one ERM round, then one conditional round. Every request
    carries the conditional LoRA and the detector; the auditor's signal reply holds the
    conditional-LoRA gradient and nothing for the task adapter; results equal co-located."""
    run = tiny_run("fairnet", rounds=1, private=False)
    m = run.experiment.method.model_copy(update=dict(cond_rounds=1, detector_steps=10, detector_examples=200,
                                                      lof_neighbors=10))
    run.experiment.method = type(m).model_validate(m.model_dump())
    port = free_port()
    res = run_local(run, tmp_path / "split", timeout=600, port=port)
    assert [r["round"] for r in res["per_round"]] == [1, 2]
    audit = [json.loads(x) for x in (tmp_path / "split" / "audit.jsonl").read_text().splitlines()]
    cond_keys = set(load_file(str(tmp_path / "split" / "model" / "fairnet_cond_lora.safetensors")))
    sent = [a for a in audit if a["direction"] == "sent"]
    received = [a for a in audit if a["direction"] == "received"]
    # round 1: val + signal; round 2: val; the τ choice; the test report
    assert [(a["round"], a["message_type"]) for a in sent] == [(1, "train"), (2, "evaluate"), (2, "train"),
                                                              (2, "evaluate")]
    for a in sent:
        assert {"adapter", "cond_adapter", "detector", "config", "head"} == set(a["records"])
        assert set(a["records"]["cond_adapter"]["keys"]) == cond_keys
    signals = [a for a in received if "cond_signal" in a["records"]]
    assert len(signals) == 1 and set(signals[0]["records"]["cond_signal"]["keys"]) == cond_keys
    assert all("signal" not in a["records"] for a in received)
    assert res["final"]["tau"] in set(run.experiment.method.taus) | {1.0}
    ref = run_colocated(run, tmp_path / "colocated")
    assert res["metrics"] == ref["metrics"] and res["final"] == ref["final"]
    a = load_file(str(tmp_path / "split" / "model" / "fairnet_cond_lora.safetensors"))
    b = load_file(str(tmp_path / "colocated" / "model" / "fairnet_cond_lora.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert _port_closed(port)
    assert wait_gone(str(tmp_path)) == []
