"""Launchers for the two parties and for a whole local experiment over Flower.

* :func:`run_developer`: the developer's machine: SuperLink + run submission; waits for the run,
  shows progress, writes results into ``out_dir``, stops the SuperLink.
* :func:`run_auditor`: the auditor's machine: a SuperNode that dials out to the developer's
  SuperLink and serves until stopped.
* :func:`run_local`: both on loopback, each from its own config file (what ``fairsplit run``
  and ``fairsplit demo`` do), with every process stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import logging
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import tomli_w

from protocol.config import RunFile, load_developer_file

from .flower import (
    FlowerError,
    ProcessGroup,
    free_port,
    start_superlink,
    start_supernode,
    submit_run,
    tail,
    wait_run,
    write_flwr_home,
)

__all__ = ["MetricsFollower", "run_auditor", "run_developer", "run_local", "write_party_files"]

log = logging.getLogger(__name__)


def _dump_toml(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(obj.model_dump(mode="json", exclude_none=True)).encode())
    return path


def write_party_files(run: RunFile, folder: Path) -> tuple[Path, Path]:
    """Write ``developer.toml`` and ``auditor.toml`` (each with only its party's table)."""
    return (_dump_toml(run.developer_file(), folder / "developer.toml"),
            _dump_toml(run.auditor_file(), folder / "auditor.toml"))


class MetricsFollower:
    """Reads new lines of a growing ``metrics.jsonl`` and hands each parsed row to a callback."""

    def __init__(self, path: Path, callback: Callable[[dict], None] | None):
        self.path = Path(path)
        self.callback = callback
        self.offset = 0

    def poll(self) -> None:
        """Deliver every complete line written since the last call."""
        if self.callback is None or not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            if line.strip():
                self.callback(json.loads(line))


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that ``finally`` blocks stop child processes."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _finish(out_dir: Path, status: str, logs: list[Path]) -> dict:
    results = out_dir / "results.json"
    error = out_dir / "error.json"
    if error.exists():
        err = json.loads(error.read_text())
        raise FlowerError(f"run failed ({status}): {err['error']}: {err['message']}")
    if not status.endswith("completed") or not results.exists():
        details = "\n".join(f"--- {p.name}\n{tail(p, 25)}" for p in logs)
        raise FlowerError(f"run ended with status {status!r} and no results.json; logs:\n{details}")
    return json.loads(results.read_text())


def _developer_session(group: ProcessGroup, dev_config: Path, out_dir: Path, superlink: str,
                       flwr_home: Path, timeout: float, on_round, node_timeout: float) -> dict:
    out_dir = out_dir.resolve()
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    (out_dir / "results.json").unlink(missing_ok=True)
    (out_dir / "error.json").unlink(missing_ok=True)
    write_flwr_home(flwr_home, superlink)
    run_id = submit_run(flwr_home, {"developer-config": str(Path(dev_config).resolve()),
                                    "out-dir": str(out_dir), "node-timeout": node_timeout},
                        out_dir / "logs" / "flwr.log")
    log.info("submitted run %s", run_id)
    follower = MetricsFollower(out_dir / "metrics.jsonl", on_round)
    status = wait_run(flwr_home, run_id, group, timeout, out_dir / "results.json", on_poll=follower.poll)
    follower.poll()
    return _finish(out_dir, status, [p for _, _, p in group.procs])


def run_developer(config: Path, out_dir: Path, host: str = "127.0.0.1", port: int = 9092,
                  timeout: float = 24 * 3600, on_round=None, node_timeout: float = 600) -> dict:
    """Developer machine: start the SuperLink on ``host:port``, submit the run, wait for it.

    The auditor's SuperNode must dial in within ``node_timeout`` seconds. Returns results.json.
    """
    load_developer_file(config)  # fail fast on a bad config, before any process starts
    out_dir = Path(out_dir)
    with _stop_on_sigterm(), ProcessGroup() as group, tempfile.TemporaryDirectory() as home:
        superlink = start_superlink(group, port, out_dir / "logs" / "superlink.log", host=host)
        return _developer_session(group, config, out_dir, superlink, Path(home), timeout,
                                  on_round, node_timeout)


def run_auditor(config: Path, superlink: str, log_dir: Path) -> None:
    """Auditor machine: run a SuperNode dialling out to ``superlink`` until interrupted."""
    from protocol.config import load_auditor_file

    load_auditor_file(config)  # fail fast on a bad config
    with _stop_on_sigterm(), ProcessGroup() as group:
        start_supernode(group, superlink, Path(config), Path(log_dir) / "supernode.log")
        try:
            while True:
                group.check_alive()
                time.sleep(1.0)
        except KeyboardInterrupt:
            log.info("auditor: stopping SuperNode")


def run_local(run: RunFile, out_dir: Path, on_round=None, timeout: float = 24 * 3600,
              port: int | None = None) -> dict:
    """Both parties on loopback as separate Flower processes, each with only its own config.

    Every process (SuperLink, SuperNode and their app subprocesses) is stopped on return, also
    when the run fails. Raises :class:`deploy.flower.FlowerError` with the reason on failure.
    """
    out_dir = Path(out_dir).resolve()
    dev_cfg, aud_cfg = write_party_files(run, out_dir / "parties")
    with _stop_on_sigterm(), ProcessGroup() as group, tempfile.TemporaryDirectory() as home:
        superlink = start_superlink(group, port or free_port(), out_dir / "logs" / "superlink.log")
        start_supernode(group, superlink, aud_cfg, out_dir / "logs" / "supernode.log")
        return _developer_session(group, dev_cfg, out_dir, superlink, Path(home), timeout,
                                  on_round, node_timeout=120)


