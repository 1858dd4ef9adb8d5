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

from auditor.executor import fab_sha256
from protocol.config import RunFile, load_auditor_file, load_developer_file

from .certs import generate
from .flower import (
    APP_DIR,
    TLS,
    FlowerError,
    ProcessGroup,
    free_port,
    register_supernode,
    start_executor,
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
                       flwr_home: Path, timeout: float, on_round, node_timeout: float,
                       tls: TLS | None, auditor_key: Path | None, resume: bool,
                       resend_after: float) -> dict:
    out_dir = out_dir.resolve()
    if not resume:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    (out_dir / "results.json").unlink(missing_ok=True)
    (out_dir / "error.json").unlink(missing_ok=True)
    write_flwr_home(flwr_home, superlink, tls.ca if tls else None)
    if tls is not None and auditor_key is not None:
        node = register_supernode(flwr_home, auditor_key)
        log.info("registered the auditor's SuperNode key %s (node %s)", auditor_key, node)
    run_id = submit_run(flwr_home, {"developer-config": str(Path(dev_config).resolve()),
                                    "out-dir": str(out_dir), "node-timeout": node_timeout,
                                    "resend-after": resend_after, "resume": resume},
                        out_dir / "logs" / "flwr.log")
    log.info("submitted run %s", run_id)
    follower = MetricsFollower(out_dir / "metrics.jsonl", on_round)
    status = wait_run(flwr_home, run_id, group, timeout, out_dir / "results.json", on_poll=follower.poll,
                      error_file=out_dir / "error.json")
    follower.poll()
    return _finish(out_dir, status, [p for _, _, p in group.procs])


def run_developer(config: Path, out_dir: Path, host: str = "127.0.0.1", port: int = 9092,
                  tls: TLS | None = None, auditor_key: Path | None = None, resume: bool = False,
                  timeout: float = 24 * 3600, on_round=None, node_timeout: float = 600,
                  resend_after: float = 120) -> dict:
    """Developer machine: start the SuperLink on ``host:port``, submit the run, wait for it.

    With ``tls`` (see :class:`deploy.flower.TLS`) the SuperLink serves TLS and admits only the
    SuperNode whose public key ``auditor_key`` is registered; ``tls=None`` is insecure. The
    SuperLink keeps its state in ``out_dir/superlink.db`` so a restarted developer (``resume``,
    continuing from ``out_dir``'s checkpoint) finds the auditor's registration again. The
    auditor's SuperNode must dial in within ``node_timeout`` seconds. Returns results.json.

    Raises:
        deploy.flower.FlowerError: a process died, the run failed, or ``timeout`` passed.
        ValueError: TLS without the auditor's public key.
    """
    load_developer_file(config)  # fail fast on a bad config, before any process starts
    if tls is not None and auditor_key is None:
        raise ValueError("TLS runs need the auditor's SuperNode public key (--auditor-key)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _stop_on_sigterm(), ProcessGroup() as group, tempfile.TemporaryDirectory() as home:
        superlink = start_superlink(group, port, out_dir / "logs" / "superlink.log", host=host,
                                    tls=tls, database=out_dir / "superlink.db")
        return _developer_session(group, config, out_dir, superlink, Path(home), timeout,
                                  on_round, node_timeout, tls, auditor_key, resume, resend_after)


def approved_hashes(config_approved: list[str]) -> list[str]:
    """The app hashes the auditor executes: its config's ``approved_app_sha256``, else the hash
    of the Flower App shipped with this installation of fairsplit."""
    return list(config_approved) or [fab_sha256(APP_DIR)]


def start_auditor_processes(group: ProcessGroup, config: Path, superlink: str, log_dir: Path,
                            root_certificates: Path | None, auth_key: Path | None,
                            new_session: bool = True) -> None:
    """Start the auditor's SuperNode (``--isolation process``) and its vetted executor."""
    f = load_auditor_file(config)
    approved = approved_hashes(f.auditor.approved_app_sha256)
    port = start_supernode(group, superlink, Path(config), Path(log_dir) / "supernode.log",
                           root_certificates=root_certificates, auth_key=auth_key,
                           new_session=new_session)
    start_executor(group, port, Path(config), approved, Path(log_dir) / "executor.log",
                   new_session=new_session)


def run_auditor(config: Path, superlink: str, log_dir: Path, root_certificates: Path | None = None,
                auth_key: Path | None = None) -> None:
    """Auditor machine: SuperNode dialling out to ``superlink`` + the vetted executor, until
    interrupted. Both children stay in this process's group, so killing the group ends all.
    A child that exits is started again after 2 s: the SuperNode gives up when the developer has
    not registered its key yet or the SuperLink is gone; the auditor keeps dialling.

    Raises:
        ValueError: TLS requested without the auditor's private key (or the reverse).
    """
    load_auditor_file(config)  # fail fast on a bad config
    if (root_certificates is None) != (auth_key is None):
        raise ValueError("give both --root-certificates and --auth-key, or --insecure")
    with _stop_on_sigterm(), ProcessGroup() as group:
        start_auditor_processes(group, config, superlink, log_dir, root_certificates, auth_key,
                                new_session=False)
        try:
            while True:  # a SuperNode refused (key not registered yet) or cut off is restarted
                time.sleep(2.0)
                group.restart_exited()
        except KeyboardInterrupt:
            log.info("auditor: stopping SuperNode and executor")


def run_local(run: RunFile, out_dir: Path, on_round=None, timeout: float = 24 * 3600,
              port: int | None = None, insecure: bool = False, resume: bool = False) -> dict:
    """Both parties on loopback as separate Flower processes, each with only its own config.

    TLS with SuperNode authentication unless ``insecure``: fresh credentials in ``out_dir/certs``
    (the developer's CA and server certificate, the auditor's key pair). The auditor's state and
    audit log go to ``out_dir/auditor`` unless its config sets ``state_dir``. Every process is
    stopped on return, also when the run fails.

    Raises:
        deploy.flower.FlowerError: with the reason, when the run fails.
    """
    out_dir = Path(out_dir).resolve()
    if run.auditor.state_dir is None:
        run = run.model_copy(update={"auditor": run.auditor.model_copy(
            update={"state_dir": out_dir / "auditor"})})
    dev_cfg, aud_cfg = write_party_files(run, out_dir / "parties")
    tls = key = None
    if not insecure:
        paths = generate(out_dir / "certs")
        tls, key = TLS(paths["ca"], paths["cert"], paths["key"]), paths["supernode_key"]
    with _stop_on_sigterm(), ProcessGroup() as group, tempfile.TemporaryDirectory() as home:
        superlink = start_superlink(group, port or free_port(), out_dir / "logs" / "superlink.log",
                                    tls=tls, database=out_dir / "superlink.db")
        if tls is not None:
            write_flwr_home(Path(home), superlink, tls.ca)
            register_supernode(Path(home), paths["supernode_pub"])
        start_auditor_processes(group, aud_cfg, superlink, out_dir / "logs",
                                tls.ca if tls else None, key)
        return _developer_session(group, dev_cfg, out_dir, superlink, Path(home), timeout,
                                  on_round, 120, tls, None, resume, 120)
