"""Shared helpers for the tests that start real Flower processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from fairsplit.deploy.demo import DEMO_CONFIG
from fairsplit.deploy.config import RunFile
from fairsplit.protocol.config import parse_config
from fairsplit.protocol.methods import method_spec


def method_table(name: str, **settings) -> dict:
    """``[experiment.method]`` for ``name`` with those of ``settings`` that the method has.

    Tests share one set of small settings (λ, batch, steps) across methods; each method's config
    refuses keys it does not have, so only its own are kept.
    """
    fields = method_spec(name).config.model_fields
    return {"name": name, **{k: v for k, v in settings.items() if k in fields}}


#: The tests' tiny ViT: a 1-block, 32-wide ViT on 32 px images (random init, builds in ~0.1 s).
TINY_VIT = {"kind": "timm", "name": "vit_tiny_patch16_224", "pretrained": False,
            "overrides": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}}


def tiny_run(method: str = "erm", rounds: int = 2, private: bool | None = None, **auditor_overrides) -> RunFile:
    """The demo experiment shrunk to a 1-block ViT, 600 synthetic examples, 3 steps per round.

    ``private``: the auditor's differential privacy (``[auditor.privacy] enabled``); default: on
    for the methods that have a private form (the default config), off for the others (which
    the auditor refuses under DP).
    """
    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["experiment"].update(rounds=rounds, local_steps=3)
    cfg["experiment"]["method"] = method_table(method, lam=0.5, auditor_batch_size=32,
                                               auditor_steps=5, sensitive_steps=4)
    cfg["experiment"]["model"]["overrides"] = dict(TINY_VIT["overrides"])
    cfg["developer"]["data"]["n"] = 600
    cfg["auditor"]["data"]["n"] = 600
    cfg["auditor"].update(auditor_overrides)
    if private is None:
        private = method_spec(method).private
    if not private:
        cfg["auditor"]["privacy"] = {**cfg["auditor"].get("privacy", {}), "enabled": False}
    return parse_config(RunFile, cfg, "<test>")


def port_closed(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) != 0


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (other than this one) that contain ``text``."""
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


def wait_gone(text: str, timeout: float = 15.0) -> list[str]:
    """Wait until no process mentions ``text``; return those still alive."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (by parent PID), whatever their session."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants at once (a crash, not a shutdown)."""
    pids = descendants(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def wait_for_round(metrics: Path, round_: int, proc, timeout: float = 600) -> None:
    """Wait until ``metrics.jsonl`` has a row for ``round_`` (raises if ``proc`` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():
            rounds = [json.loads(x).get("round") for x in metrics.read_text().splitlines() if x.strip()]
            if round_ in rounds:
                return
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before round {round_}")
        time.sleep(0.2)
    raise AssertionError(f"round {round_} not reached within {timeout} s")
