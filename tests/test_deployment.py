"""Deployment security and faults with real Flower processes on loopback.

* only the registered auditor key over TLS may connect (unregistered key, plaintext: refused);
* the auditor executes only the app build it approved: a tampered app is refused before the
  auditor's config or data files are opened;
* the auditor killed mid-run (SIGKILL of its whole process tree) and restarted: the run
  continues from the same round and ends exactly like an uninterrupted run;
* the developer killed mid-run and restarted with ``--resume``: same final result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import kill_tree, port_closed, tiny_run, wait_for_round, wait_gone
from PIL import Image
from safetensors.torch import load_file

from fairsplit.deploy.certs import generate, generate_supernode_keys
from fairsplit.deploy.colocated import run_colocated
from fairsplit.deploy.flower import (
    APP_DIR,
    TLS,
    FlowerError,
    ProcessGroup,
    _bin,
    _env,
    free_port,
    register_supernode,
    start_executor,
    start_superlink,
    start_supernode,
    submit_run,
    wait_run,
    write_flwr_home,
)
from fairsplit.deploy.launch import approved_hashes, write_party_files
from fairsplit.deploy.config import RunFile
from fairsplit.protocol.config import parse_config

pytestmark = pytest.mark.flower


@pytest.fixture(autouse=True)
def _flwr_env(flwr_env):
    """Every test here starts real Flower processes (conftest's ``flwr_env``)."""


def _nodes(home: Path) -> list[dict]:
    res = subprocess.run([_bin("flwr"), "supernode", "list", "fairsplit", "--format", "json"],
                         env=_env(home), capture_output=True, text=True, timeout=60)
    return json.loads(res.stdout).get("nodes", [])


def test_only_the_registered_auditor_over_tls_may_connect(tmp_path):
    creds = generate(tmp_path / "certs")
    stranger = generate_supernode_keys(tmp_path / "stranger")
    home = tmp_path / "home"
    cfg = tmp_path / "auditor.toml"
    cfg.write_text("")  # never read: no task reaches these nodes
    with ProcessGroup() as group:
        superlink = start_superlink(group, free_port(), tmp_path / "superlink.log",
                                    tls=TLS(creds["ca"], creds["cert"], creds["key"]))
        write_flwr_home(home, superlink, creds["ca"])
        node_id = register_supernode(home, creds["supernode_pub"])
        assert node_id is not None
        retry = ["--max-retries", "1", "--max-wait-time", "5"]
        unregistered = group.start("unregistered", [
            _bin("flower-supernode"), "--superlink", superlink, "--port", str(free_port()),
            "--isolation", "process", "--root-certificates", str(creds["ca"]),
            "--auth-supernode-private-key", str(stranger["key"]), *retry], tmp_path / "unreg.log")
        plaintext = group.start("plaintext", [
            _bin("flower-supernode"), "--superlink", superlink, "--port", str(free_port()),
            "--isolation", "process", "--insecure", *retry], tmp_path / "plain.log")
        assert unregistered.wait(timeout=120) != 0, (tmp_path / "unreg.log").read_text()[-2000:]
        assert plaintext.wait(timeout=120) != 0, (tmp_path / "plain.log").read_text()[-2000:]
        # the registered key over TLS is admitted (control: the refusals above are not a fluke)
        start_supernode(group, superlink, cfg, tmp_path / "ok.log",
                        root_certificates=creds["ca"], auth_key=creds["supernode_key"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = _nodes(home)
            if any(n["status"] == "online" for n in nodes):
                break
            time.sleep(1)
        assert [(int(n["node-id"]), n["status"]) for n in nodes] == [(node_id, "online")]
    assert wait_gone(str(tmp_path)) == []


def _fake_utkface(root: Path, n: int = 240) -> list[Path]:
    """``n`` tiny JPEGs named like UTKFace crops (age_gender_race_date), atime set into the past."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        p = root / f"{20 + i % 50}_{i % 2}_{i % 3}_20170101{i:06d}.jpg.chip.jpg"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
        files.append(p)
    return files


def _age_atime(paths: list[Path]) -> dict[Path, float]:
    """Put each file's atime 1000 s before its mtime, so that any read updates it (relatime)."""
    out = {}
    for p in paths:
        st = p.stat()
        os.utime(p, (st.st_mtime - 1000, st.st_mtime))
        out[p] = p.stat().st_atime
    return out


def test_tampered_app_is_refused_before_any_auditor_file_is_read(tmp_path):
    run = tiny_run(rounds=1)
    cfg = json.loads(run.model_dump_json())
    images = _fake_utkface(tmp_path / "auditor-data")
    cfg["auditor"]["data"] = {"kind": "utkface", "root": str(tmp_path / "auditor-data"),
                              "task": "gender", "sensitive": "race"}
    run = parse_config(RunFile, cfg, "<test>")
    dev_cfg, aud_cfg = write_party_files(run, tmp_path / "cfg")

    # the developer changes one line of the app: it would read the auditor's data and leak it
    app = tmp_path / "tampered-app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "tampered-code-ran"
    client = app / "fairsplit_client.py"
    client.write_text(client.read_text().replace(
        "app = _clientapp.app",
        f"app = _clientapp.app; open({str(marker)!r}, 'w').write(open({str(images[0])!r}, 'rb').read().hex())"))
    genuine = approved_hashes([])
    from fairsplit.auditor.executor import fab_sha256
    assert fab_sha256(app) not in genuine and fab_sha256(APP_DIR) in genuine

    creds = generate(tmp_path / "certs")
    out = tmp_path / "dev-out"
    home = tmp_path / "home"
    with ProcessGroup() as group:
        superlink = start_superlink(group, free_port(), tmp_path / "logs" / "superlink.log",
                                    tls=TLS(creds["ca"], creds["cert"], creds["key"]))
        write_flwr_home(home, superlink, creds["ca"])
        register_supernode(home, creds["supernode_pub"])
        port = start_supernode(group, superlink, aud_cfg, tmp_path / "logs" / "supernode.log",
                               root_certificates=creds["ca"], auth_key=creds["supernode_key"])
        start_executor(group, port, aud_cfg, genuine, tmp_path / "logs" / "executor.log")
        # the auditor's own warm-up reads its config and data once, before serving; from then on
        # nothing may open them again
        deadline = time.monotonic() + 300
        while "serving tasks" not in (tmp_path / "logs" / "executor.log").read_text():
            assert time.monotonic() < deadline, "executor did not start"
            group.check_alive()
            time.sleep(0.5)
        atimes = _age_atime([*images, aud_cfg])
        run_id = submit_run(home, {"developer-config": str(dev_cfg), "out-dir": str(out)},
                            tmp_path / "logs" / "flwr.log", app_dir=app)
        status = wait_run(home, run_id, group, 600, out / "error.json")
        group.check_alive()  # the auditor's processes keep running after the refusal
    assert status == "finished:failed" or (out / "error.json").exists(), status
    err = json.loads((out / "error.json").read_text())
    assert "refuses app bundle" in err["message"] and fab_sha256(app) in err["message"]
    assert not marker.exists()
    assert {p: p.stat().st_atime for p in atimes} == atimes  # the refusal opened no auditor file
    images[0].read_bytes()  # control: on this file system a read does move the atime
    assert images[0].stat().st_atime != atimes[images[0]]
    assert wait_gone(str(tmp_path)) == []


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "adapter_model.safetensors"))


def _assert_same_result(out: Path, ref: dict, ref_out: Path) -> None:
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"] == ref["metrics"]
    assert [r["train_loss"] for r in res["per_round"]] == [r["train_loss"] for r in ref["per_round"]]
    a, b = _adapter(out), _adapter(ref_out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def _parties(tmp_path: Path, rounds: int = 4):
    # exact releases: the restarted deployment and the reference (another state_dir, so another
    # secret) must agree bit for bit
    run = tiny_run("adversarial", rounds=rounds, private=False, state_dir=str(tmp_path / "auditor-state"))
    ref = run_colocated(run.model_copy(update={"auditor": run.auditor.model_copy(
        update={"state_dir": tmp_path / "ref-state"})}), tmp_path / "reference")
    dev_cfg, aud_cfg = write_party_files(run, tmp_path / "cfg")
    creds = generate(tmp_path / "certs")
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    port = free_port()

    def auditor() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "fairsplit.deploy.cli", "auditor", "--config", str(aud_cfg),
             "--superlink", f"127.0.0.1:{port}", "--logs", str(tmp_path / "auditor-logs"),
             "--root-certificates", str(creds["ca"]), "--auth-key", str(creds["supernode_key"])],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def developer(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "fairsplit.deploy.cli", "developer", "--config", str(dev_cfg),
             "--port", str(port), "--out", str(tmp_path / "dev-out"), "--certs",
             str(tmp_path / "certs"), "--resend-after", "8", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

    return ref, port, auditor, developer


def test_auditor_killed_mid_run_then_restarted_gives_the_uninterrupted_result(tmp_path):
    ref, port, auditor, developer = _parties(tmp_path)
    aud = auditor()
    dev = developer()
    try:
        wait_for_round(tmp_path / "dev-out" / "metrics.jsonl", 1, dev)
        killed = kill_tree(aud.pid)  # the auditor's machine dies: SuperNode and executor
        assert len(killed) >= 3
        time.sleep(3)
        aud = auditor()  # back, same key and state_dir
        out, _ = dev.communicate(timeout=600)
        assert dev.returncode == 0, out[-3000:]
    finally:
        kill_tree(dev.pid)
        kill_tree(aud.pid)
    _assert_same_result(tmp_path / "dev-out", ref, tmp_path / "reference")
    assert wait_gone(str(tmp_path)) == []
    assert port_closed(port)


def test_developer_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    ref, port, auditor, developer = _parties(tmp_path)
    aud = auditor()
    dev = developer()
    try:
        wait_for_round(tmp_path / "dev-out" / "metrics.jsonl", 2, dev)
        killed = kill_tree(dev.pid)  # the developer's machine dies: CLI, SuperLink, ServerApp
        assert len(killed) >= 2
        deadline = time.monotonic() + 30
        while not port_closed(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (tmp_path / "dev-out" / "checkpoint").exists()
        dev = developer("--resume")
        out, _ = dev.communicate(timeout=600)
        assert dev.returncode == 0, out[-3000:]
    finally:
        kill_tree(dev.pid)
        kill_tree(aud.pid)
    _assert_same_result(tmp_path / "dev-out", ref, tmp_path / "reference")
    rows = [json.loads(x) for x in (tmp_path / "dev-out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # no round lost, none duplicated
    assert wait_gone(str(tmp_path)) == []
