"""Integration: real flower-superlink / flower-supernode processes on loopback.

Tiny ViT + synthetic data, two rounds. Checks results.json, that the split run equals the
co-located reference run, that an auditor refusal reaches the developer with its reason, and that
every process is stopped afterwards (also after a failure).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploy.colocated import run_colocated
from deploy.demo import DEMO_CONFIG
from deploy.flower import FlowerError, free_port
from deploy.launch import run_local
from protocol.config import RunFile, parse_config
from protocol.metrics import REPORT_KEYS

pytestmark = pytest.mark.flower

RESULT_KEYS = {"method", "dataset", "metrics", "per_round", "rounds", "wall_time_s",
               "bytes_to_auditor", "bytes_from_auditor"}


def tiny_run(method: str = "erm", **auditor_overrides) -> RunFile:
    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["experiment"].update(rounds=2, local_steps=3)
    cfg["experiment"]["method"] = {"name": method, "lam": 0.5, "auditor_batch_size": 32,
                                   "auditor_steps": 5, "sensitive_steps": 4}
    cfg["experiment"]["model"]["overrides"] = {"img_size": 32, "patch_size": 8, "depth": 1,
                                               "embed_dim": 32, "num_heads": 2}
    cfg["developer"]["data"]["n"] = 600
    cfg["auditor"]["data"]["n"] = 600
    cfg["auditor"].update(auditor_overrides)
    return parse_config(RunFile, cfg, "<test>")


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


@pytest.fixture(autouse=True)
def _flwr_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FAIRSPLIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("method", ["erm", "unlearning", "adversarial", "orthogonality", "entropy"])
def test_two_rounds_over_flower_match_colocated(tmp_path, method):
    run = tiny_run(method)
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
        allowed = {"report", "signal", "update", "signal_metrics"}
        assert set(recs) <= allowed, recs
        for name in ("report", "signal_metrics"):
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
    assert _processes_mentioning(str(tmp_path)) == []


def test_auditor_refusal_reaches_developer_and_processes_stop(tmp_path):
    # 90 examples per evaluation split: a minimum group size of 1000 must be refused.
    run = tiny_run(min_group_size=1000)
    port = free_port()
    with pytest.raises(FlowerError, match="min_group_size=1000"):
        run_local(run, tmp_path / "split", timeout=600, port=port)
    assert not (tmp_path / "split" / "results.json").exists()
    assert _port_closed(port)
    assert _processes_mentioning(str(tmp_path)) == []


def test_separate_party_commands(tmp_path):
    """`fairsplit auditor` and `fairsplit developer` as two OS processes, each with its own file."""
    import signal
    import subprocess
    import sys
    import time

    from deploy.launch import write_party_files

    run = tiny_run()
    run.experiment.rounds = 1
    dev_cfg, aud_cfg = write_party_files(run, tmp_path / "cfg")
    assert "[auditor" not in dev_cfg.read_text() and "sensitive = true" not in dev_cfg.read_text()
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    auditor = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "auditor", "--config", str(aud_cfg),
         "--superlink", f"127.0.0.1:{port}", "--logs", str(tmp_path / "auditor-logs")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dev = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "developer", "--config", str(dev_cfg),
             "--port", str(port), "--out", str(tmp_path / "dev-out")],
            env=env, capture_output=True, text=True, timeout=600)
        assert dev.returncode == 0, dev.stdout + dev.stderr
        res = json.loads((tmp_path / "dev-out" / "results.json").read_text())
        assert res["transport"] == "flower" and res["rounds"] == 1
        assert auditor.poll() is None  # the auditor serves until it is stopped
    finally:
        os.killpg(auditor.pid, signal.SIGTERM)
        auditor.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(tmp_path)) == []
    assert _port_closed(port)
