"""The compose topology on two network hosts: Linux network namespaces joined by a veth pair.

The developer's namespace gets 10.231.0.1, the auditor's 10.231.0.2; nothing else is reachable
from either. Inside them run the same commands as the compose services (per-party credential
steps, ``fairsplit developer`` and ``fairsplit auditor``) with TLS and SuperNode authentication,
for a one-round run. Skipped where network namespaces cannot be created (not root, no ``ip``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from flower_helpers import kill_tree, tiny_run, wait_gone

from fairsplit.deploy.launch import write_party_files

pytestmark = pytest.mark.flower

DEV_IP, AUD_IP, PORT = "10.231.0.1", "10.231.0.2", 9092


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def namespaces():
    """Two namespaces ``(dev, aud)`` with loopback up and a veth pair between them."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (`ip`) to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    dev, aud = f"fsdev{tag}", f"fsaud{tag}"
    probe = _ip("netns", "add", dev, check=False)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces not permitted here: {probe.stderr.strip()}")
    try:
        _ip("netns", "add", aud)
        _ip("link", "add", f"v{dev}", "type", "veth", "peer", "name", f"v{aud}")
        _ip("link", "set", f"v{dev}", "netns", dev)
        _ip("link", "set", f"v{aud}", "netns", aud)
        for ns, ip in ((dev, DEV_IP), (aud, AUD_IP)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", f"v{ns}")
            _ip("-n", ns, "link", "set", f"v{ns}", "up")
        yield dev, aud
    finally:
        _ip("netns", "del", dev, check=False)
        _ip("netns", "del", aud, check=False)


def _in(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "fairsplit.deploy.cli", *cmd]


def test_two_hosts_over_tls_with_node_auth(tmp_path, namespaces):
    dev_ns, aud_ns = namespaces
    run = tiny_run(rounds=1, state_dir=str(tmp_path / "auditor" / "state"))
    dev_cfg, aud_cfg = write_party_files(run, tmp_path / "cfg")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path / "flwr-home")}
    secrets, keys = tmp_path / "developer" / "secrets", tmp_path / "auditor" / "secrets"

    # the credential steps of compose.yaml, each in its party's namespace
    for ns, args in ((dev_ns, ["certs", "--only", "superlink", "--san", DEV_IP, "--out", str(secrets)]),
                     (aud_ns, ["certs", "--only", "supernode", "--out", str(keys)])):
        subprocess.run(_in(ns, *args), env=env, check=True, capture_output=True, timeout=120)

    # the two hosts reach each other over the veth link (not loopback)
    assert subprocess.run(["ip", "netns", "exec", aud_ns, "ping", "-c", "1", "-W", "2", DEV_IP],
                          capture_output=True).returncode == 0 or shutil.which("ping") is None

    auditor = subprocess.Popen(
        _in(aud_ns, "auditor", "--config", str(aud_cfg), "--superlink", f"{DEV_IP}:{PORT}",
            "--root-certificates", str(secrets / "ca.pem"),  # the only file the auditor gets
            "--auth-key", str(keys / "auditor_supernode"), "--logs", str(tmp_path / "auditor" / "logs")),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        dev = subprocess.run(
            _in(dev_ns, "developer", "--config", str(dev_cfg), "--out", str(tmp_path / "developer" / "out"),
                "--host", DEV_IP, "--port", str(PORT), "--certs", str(secrets),
                "--auditor-key", str(keys / "auditor_supernode.pub")),  # the only file it gets
            env=env, capture_output=True, text=True, timeout=900)
        assert dev.returncode == 0, dev.stdout[-3000:] + dev.stderr[-3000:]
    finally:
        kill_tree(auditor.pid)
    res = json.loads((tmp_path / "developer" / "out" / "results.json").read_text())
    assert res["transport"] == "flower" and res["rounds"] == 1
    assert res["metrics"]["n"] > 0
    sl_log = (tmp_path / "developer" / "out" / "logs" / "superlink.log").read_text()
    assert AUD_IP in sl_log  # the auditor really came over the veth link, not loopback
    assert wait_gone(str(tmp_path)) == []
