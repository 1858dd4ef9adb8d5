"""Launchers for the two parties and for whole local experiments over Flower.

* :class:`DeveloperSide`: the developer's long-lived processes (SuperLink ``--isolation
  process`` + the developer's ServerApp executor), serving one run after another.
* :func:`run_developer`: the developer's machine: a :class:`DeveloperSide`, one run per config
  in turn; waits for each, shows progress, writes results, stops the processes.
* :func:`run_auditor`: the auditor's machine: a SuperNode that dials out to the developer's
  SuperLink, and the vetted executor, serving until stopped.
* :class:`LocalDeployment`: both parties on loopback, each from its own config file, serving
  many runs (``fairsplit tune``); :func:`run_local` is one run on it (``fairsplit run`` and
  ``fairsplit demo``). Every process is stopped at the end, also on failure.
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

from fairsplit.auditor.executor import fab_sha256
from fairsplit.auditor.config import load_auditor_file
from fairsplit.deploy.config import RunFile
from fairsplit.developer.config import load_developer_file

from .certs import generate
from .flower import (
    APP_DIR,
    TLS,
    FlowerError,
    ProcessGroup,
    free_port,
    register_supernode,
    start_developer_executor,
    start_executor,
    start_superlink,
    start_supernode,
    submit_run,
    tail,
    wait_run,
    write_flwr_home,
)

__all__ = ["DeveloperSide", "LocalDeployment", "MetricsFollower", "SupernodeWatch", "run_auditor",
           "run_developer", "run_local", "write_party_files"]

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


class DeveloperSide:
    """The developer's long-lived processes: the SuperLink (``--isolation process``) and the
    developer's ServerApp executor (:mod:`developer.executor`), serving run after run.

    Args:
        group: where the processes are started (stopped with it).
        port / host: the SuperLink's listen address.
        log_dir: ``superlink.log``, ``developer-executor.log``.
        tls: the SuperLink's TLS files (None: insecure).
        database: the SuperLink's SQLite file (registrations, runs), kept across restarts.
        flwr_home: a folder for this side's ``$FLWR_HOME`` (the Control API connection).

    Raises:
        deploy.flower.FlowerError: a process did not start.
    """

    def __init__(self, group: ProcessGroup, port: int, log_dir: Path, flwr_home: Path,
                 host: str = "127.0.0.1", tls: TLS | None = None, database: Path | None = None):
        self.group, self.tls, self.flwr_home = group, tls, Path(flwr_home)
        self.superlink = start_superlink(group, port, Path(log_dir) / "superlink.log", host=host,
                                         tls=tls, database=database, isolation="process")
        write_flwr_home(self.flwr_home, self.superlink, tls.ca if tls else None)
        start_developer_executor(group, self.superlink, tls.ca if tls else None,
                                 Path(log_dir) / "developer-executor.log")
        self.runs = 0

    def register(self, auditor_key: Path) -> None:
        """Register the auditor's SuperNode public key (TLS with node authentication)."""
        node = register_supernode(self.flwr_home, auditor_key)
        log.info("registered the auditor's SuperNode key %s (node %s)", auditor_key, node)

    def run(self, dev_config: Path, out_dir: Path, timeout: float = 24 * 3600, on_round=None,
            node_timeout: float = 120, resume: bool = False, resend_after: float = 120) -> dict:
        """Submit one run of the developer config ``dev_config`` (a new Flower run on this
        deployment) and wait for it; returns its ``results.json``.

        Raises:
            deploy.flower.FlowerError: a process died, the run failed, or ``timeout`` passed.
        """
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        (out_dir / "results.json").unlink(missing_ok=True)
        (out_dir / "error.json").unlink(missing_ok=True)
        run_id = submit_run(self.flwr_home, {"developer-config": str(Path(dev_config).resolve()),
                                             "out-dir": str(out_dir), "node-timeout": node_timeout,
                                             "resend-after": resend_after, "resume": resume},
                            out_dir / "logs" / "flwr.log")
        self.runs += 1
        log.info("submitted run %s", run_id)
        follower = MetricsFollower(out_dir / "metrics.jsonl", on_round)
        status = wait_run(self.flwr_home, run_id, self.group, timeout, out_dir / "results.json",
                          on_poll=follower.poll, error_file=out_dir / "error.json")
        follower.poll()
        return _finish(out_dir, status, [p for _, _, p in self.group.procs])


def run_developer(config: Path | list[Path], out_dir: Path, host: str = "127.0.0.1", port: int = 9092,
                  tls: TLS | None = None, auditor_key: Path | None = None, resume: bool = False,
                  timeout: float = 24 * 3600, on_round=None, node_timeout: float = 600,
                  resend_after: float = 120, on_start=None) -> dict | list[dict]:
    """Developer machine: start the SuperLink on ``host:port`` and the developer's executor, then
    submit each config's run, one after another, on that one deployment, and wait for each.

    With ``tls`` (see :class:`deploy.flower.TLS`) the SuperLink serves TLS and admits only the
    SuperNode whose public key ``auditor_key`` is registered; ``tls=None`` is insecure. The
    SuperLink keeps its state in ``out_dir/superlink.db`` so a restarted developer (``resume``,
    continuing from the output folder's checkpoint) finds the auditor's registration again. The
    auditor's SuperNode must dial in within ``node_timeout`` seconds. One config: its outputs in
    ``out_dir``, returns its results.json; several: ``out_dir/<i>-<config stem>`` each, returns
    the list. ``on_start(i, config)`` is called before each run.

    Raises:
        deploy.flower.FlowerError: a process died, a run failed, or ``timeout`` passed.
        ValueError: TLS without the auditor's public key.
        protocol.config.ConfigError: a config is invalid (checked before anything starts).
    """
    configs = [Path(c) for c in (config if isinstance(config, (list, tuple)) else [config])]
    for c in configs:
        load_developer_file(c)  # fail fast on a bad config, before any process starts
    if tls is not None and auditor_key is None:
        raise ValueError("TLS runs need the auditor's SuperNode public key (--auditor-key)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [out_dir] if len(configs) == 1 else [out_dir / f"{i}-{c.stem}" for i, c in enumerate(configs)]
    results = []
    with _stop_on_sigterm(), ProcessGroup() as group, tempfile.TemporaryDirectory() as home:
        side = DeveloperSide(group, port, out_dir / "logs", Path(home), host=host, tls=tls,
                             database=out_dir / "superlink.db")
        if tls is not None:
            side.register(auditor_key)
        for i, (c, o) in enumerate(zip(configs, outs)):
            if on_start is not None:
                on_start(i, c)
            results.append(side.run(c, o, timeout, on_round, node_timeout, resume, resend_after))
    return results[0] if len(configs) == 1 else results


def approved_hashes(config_approved: list[str]) -> list[str]:
    """The app hashes the auditor executes: its config's ``approved_app_sha256``, else the hash
    of the Flower App shipped with this installation of fairsplit."""
    return list(config_approved) or [fab_sha256(APP_DIR)]


def start_auditor_processes(group: ProcessGroup, config: Path, superlink: str, log_dir: Path,
                            root_certificates: Path | None, auth_key: Path | None,
                            new_session: bool = True, state_dir: Path | None = None) -> None:
    """Start the auditor's SuperNode (``--isolation process``) and its vetted executor;
    ``state_dir``: the auditor's state folder when its config names none."""
    f = load_auditor_file(config)
    approved = approved_hashes(f.auditor.approved_app_sha256)
    port = start_supernode(group, superlink, Path(config), Path(log_dir) / "supernode.log",
                           root_certificates=root_certificates, auth_key=auth_key,
                           new_session=new_session)
    start_executor(group, port, Path(config), approved, Path(log_dir) / "executor.log",
                   new_session=new_session, state_dir=state_dir)


def auditor_state_dir(f, superlink: str) -> Path:
    """The auditor's state folder: its config's ``state_dir``, else the default for the SuperLink
    it serves (:func:`auditor.state.default_state_dir`). The privacy state there is opened and
    checked now, so a damaged or incomplete one stops the auditor before it dials out.

    Raises:
        auditor.state.PrivacyStateError: the folder is not writable, or its privacy files are
            damaged or incomplete.
    """
    from fairsplit.auditor.state import PrivacyState, default_state_dir

    state_dir = Path(f.auditor.state_dir) if f.auditor.state_dir is not None else default_state_dir(superlink)
    PrivacyState(state_dir, f.auditor.max_runs, f.auditor.privacy)
    return state_dir


def check_auditor_groups(f) -> bool:
    """The auditor's start-up check of ``min_group_size`` on its evaluation parts, on its own
    console: logs each group that is too small, with its size, and how to fix it. Returns
    whether the check passed. The executor makes the same check and then refuses every request
    with the fixed ``E_SMALL_GROUP`` code (the sizes never cross).

    Raises:
        protocol.data.DataError: the auditor's data cannot be loaded.
    """
    from fairsplit.auditor.host import AuditorHost
    from fairsplit.protocol.metrics import SmallGroupError

    try:
        AuditorHost(f.experiment, f.auditor, f.tune).check()
    except SmallGroupError as err:
        log.error("the auditor will refuse every request: %s", err)
        return False
    return True


class SupernodeWatch:
    """Decides, for :meth:`deploy.flower.ProcessGroup.restart_exited`, whether the auditor's
    exited SuperNode is started again, from Flower's exit code in its log
    (:func:`auditor.flower_compat.classify_supernode_exit`).

    * transient (the SuperLink went away, the connection was lost): restart, quietly;
    * the SuperLink refused to activate this SuperNode: restart, warning once what it means,
      for up to ``refused_grace`` seconds from the first refusal in a row (the developer may not
      have registered the key yet, or this key's killed predecessor is still marked online for
      up to 60 s); refused still after that: stop;
    * permanent (TLS certificate not signed by the given CA, a bad key file, bad TLS options,
      an address that does not parse): stop at once.

    Stopping raises :class:`deploy.flower.FlowerError` with the cause in plain words and Flower's
    own lines. Other processes' exits are left to the restart.

    Args:
        refused_grace: seconds (from the first refusal in a row) to keep retrying a refused key.
        log_path: the SuperNode's log, named in the messages.
    """

    def __init__(self, refused_grace: float, log_path: Path):
        self.refused_grace, self.log_path = refused_grace, Path(log_path)
        self.refused_since: float | None = None

    def __call__(self, name: str, returncode: int, log_text: str) -> None:
        """Raises FlowerError when the SuperNode ``name`` must not be restarted."""
        from fairsplit.auditor.flower_compat import classify_supernode_exit

        if name != "flower-supernode":
            return
        why = classify_supernode_exit(log_text)
        where = f"(Flower exit code {why.code}; log: {self.log_path})"
        if why.permanent:
            raise FlowerError(f"the auditor's SuperNode cannot connect to the developer's SuperLink "
                              f"and retrying will not help {where}:\n{why.reason}")
        if not why.refused:
            self.refused_since = None
            return
        now = time.monotonic()
        if self.refused_since is None:
            self.refused_since = now
            log.warning("the developer's SuperLink refused this SuperNode's key (%s); it is not "
                        "registered there yet, or a SuperNode with this key that was killed is "
                        "still marked online (for up to 60 s). Retrying for %.0f s.",
                        why.reason.replace("\n", " "), self.refused_grace)
        elif now - self.refused_since >= self.refused_grace:
            cause = ("the key is not registered there" if self.refused_grace >= 60 else
                     "the key is not registered there, or (within 60 s of a crash) a killed "
                     "SuperNode with this key is still marked online")
            raise FlowerError(
                f"the developer's SuperLink has refused this SuperNode's key for "
                f"{now - self.refused_since:.0f} s {where}: {cause}. Ask "
                f"the developer to register this key's .pub file (fairsplit developer "
                f"--auditor-key) or check that --auth-key is the key they registered.\n{why.reason}")


def run_auditor(config: Path, superlink: str, log_dir: Path, root_certificates: Path | None = None,
                auth_key: Path | None = None, refused_grace: float = 90.0) -> None:
    """Auditor machine: SuperNode dialling out to ``superlink`` + the vetted executor, until
    interrupted. Both children stay in this process's group, so killing the group ends all.
    A child that exits is started again after 2 s, except a SuperNode that cannot succeed
    (:class:`SupernodeWatch`): the SuperNode gives up when the SuperLink is gone (restarted:
    the auditor keeps dialling), when the SuperLink refuses its key (restarted for
    ``refused_grace`` seconds: the developer may not have registered it yet), and on a wrong CA
    or a bad key file (not restarted).

    The auditor's privacy state lives in its config's ``state_dir``, else in the default folder
    for ``superlink`` (:func:`auditor_state_dir`); a damaged or incomplete one stops it here.
    Before serving it checks ``min_group_size`` on its evaluation parts
    (:func:`check_auditor_groups`): a failure is shown on the auditor's console, and the
    executor then refuses every request.

    Raises:
        ValueError: TLS requested without the auditor's private key (or the reverse).
        deploy.flower.FlowerError: the SuperNode cannot connect, with the cause (see
            :class:`SupernodeWatch`); every child is stopped first.
    """
    f = load_auditor_file(config)  # fail fast on a bad config
    if (root_certificates is None) != (auth_key is None):
        raise ValueError("give both --root-certificates and --auth-key, or --insecure")
    state_dir = auditor_state_dir(f, superlink)
    log.info("auditor state (privacy ledger, run registry, answers): %s", state_dir)
    f = f.model_copy(update={"auditor": f.auditor.model_copy(update={"state_dir": state_dir})})
    check_auditor_groups(f)
    with _stop_on_sigterm(), ProcessGroup() as group:
        start_auditor_processes(group, config, superlink, log_dir, root_certificates, auth_key,
                                new_session=False, state_dir=state_dir)
        watch = SupernodeWatch(refused_grace, Path(log_dir) / "supernode.log")
        try:
            while True:  # a SuperNode cut off, or refused for a while, is restarted
                time.sleep(2.0)
                group.restart_exited(watch)
        except KeyboardInterrupt:
            log.info("auditor: stopping SuperNode and executor")


class LocalDeployment:
    """Both parties' long-lived processes on loopback, serving one run after another.

    The developer's side (:class:`DeveloperSide`: SuperLink ``--isolation process`` + its
    executor) and the auditor's (SuperNode ``--isolation process`` + vetted executor, given only
    its own config: ``run``'s ``[experiment]``, ``[auditor]`` and ``[tune]``, the search space
    it admits) start once; each :meth:`run` is a new Flower run. TLS with SuperNode
    authentication unless ``insecure``: fresh credentials in ``out_dir/certs``. The auditor's
    state and audit log go to ``out_dir/auditor`` unless its config sets ``state_dir``.
    Use as a context manager; every process is stopped on exit, also on failure.

    Raises:
        deploy.flower.FlowerError: a process did not start.
    """

    def __init__(self, run: RunFile, out_dir: Path, insecure: bool = False, port: int | None = None):
        self.out_dir = Path(out_dir).resolve()
        if run.auditor.state_dir is None:
            run = run.model_copy(update={"auditor": run.auditor.model_copy(
                update={"state_dir": self.out_dir / "auditor"})})
        self.base = run
        self.insecure, self.port = insecure, port
        self._stack = None

    def __enter__(self) -> "LocalDeployment":
        from contextlib import ExitStack

        stack = ExitStack()
        try:
            stack.enter_context(_stop_on_sigterm())
            self.group = stack.enter_context(ProcessGroup())
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            _, aud_cfg = write_party_files(self.base, self.out_dir / "parties")
            tls = key = None
            if not self.insecure:
                paths = generate(self.out_dir / "certs")
                tls, key = TLS(paths["ca"], paths["cert"], paths["key"]), paths["supernode_key"]
            self.developer = DeveloperSide(self.group, self.port or free_port(), self.out_dir / "logs",
                                           home, tls=tls, database=self.out_dir / "superlink.db")
            if tls is not None:
                self.developer.register(paths["supernode_pub"])
            start_auditor_processes(self.group, aud_cfg, self.developer.superlink, self.out_dir / "logs",
                                    tls.ca if tls else None, key)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def run(self, run: RunFile, out_dir: Path, on_round=None, timeout: float = 24 * 3600,
            resume: bool = False) -> dict:
        """One run of ``run``'s ``[experiment]`` + ``[developer]`` (the developer's part only is
        written to ``out_dir/parties/developer.toml``); returns its ``results.json``.

        Raises:
            deploy.flower.FlowerError: with the reason, when the run fails.
        """
        out_dir = Path(out_dir).resolve()
        dev_cfg = _dump_toml(run.developer_file(), out_dir / "parties" / "developer.toml")
        return self.developer.run(dev_cfg, out_dir, timeout, on_round, 120, resume, 120)


def run_local(run: RunFile, out_dir: Path, on_round=None, timeout: float = 24 * 3600,
              port: int | None = None, insecure: bool = False, resume: bool = False) -> dict:
    """Both parties on loopback as separate Flower processes, each with only its own config.

    One run on a :class:`LocalDeployment` (TLS with SuperNode authentication unless
    ``insecure``; credentials in ``out_dir/certs``; the auditor's state in ``out_dir/auditor``
    unless its config sets ``state_dir``). Every process is stopped on return, also when the
    run fails.

    Raises:
        deploy.flower.FlowerError: with the reason, when the run fails.
    """
    with LocalDeployment(run, out_dir, insecure=insecure, port=port) as deployment:
        return deployment.run(run, out_dir, on_round, timeout, resume)
