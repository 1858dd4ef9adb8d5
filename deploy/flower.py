"""Starting and stopping Flower's deployment processes for fairsplit.

* developer side: ``flower-superlink`` (Fleet, Control and Runtime APIs on one HTTP port; TLS and
  SuperNode authentication unless insecure; ``--isolation process`` with the developer's
  long-lived ServerApp executor, :mod:`developer.executor`), the auditor key's registration
  (``flwr supernode register``) and the run submission (what ``flwr run`` does, through the
  Control API in-process) of the fairsplit Flower App in :mod:`deploy.flowerapp`;
* auditor side: ``flower-supernode`` dialling out to the SuperLink with ``--isolation process``,
  and the auditor's vetted executor (:mod:`auditor.executor`) serving its local Runtime API.

Processes are started in their own session by default and stopped with their whole process group
(the SuperLink's ServerApp subprocess included), also on error; the auditor's command keeps its
children in its own group instead, so that killing the auditor ends them too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "APP_DIR",
    "FlowerError",
    "ProcessGroup",
    "TLS",
    "free_port",
    "register_supernode",
    "start_developer_executor",
    "start_executor",
    "start_superlink",
    "start_supernode",
    "submit_run",
    "wait_run",
    "write_flwr_home",
]

log = logging.getLogger(__name__)

#: The Flower App folder submitted with ``flwr run``.
APP_DIR = Path(__file__).resolve().parent / "flowerapp"


class FlowerError(RuntimeError):
    """A Flower process failed to start, exited early, or a run failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FlowerError(f"{name} not found; is flwr installed in this environment?")
    return found


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


@dataclass
class ProcessGroup:
    """Processes started by fairsplit; ``stop()`` ends them all (SIGTERM, then SIGKILL)."""

    procs: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)
    specs: dict[str, tuple] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)  # log size when each was last started

    def start(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, new_session: bool = True) -> subprocess.Popen:
        """Start ``cmd`` with stdout/stderr to ``log_path``.

        With ``new_session`` (default) the process leads its own session and is stopped with its
        whole group; without, it stays in the caller's process group (so that killing the caller's
        group, e.g. the auditor's, also ends it).
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_path, "ab")
        self.offsets[name] = fh.tell()
        log.info("starting %s: %s", name, " ".join(cmd))
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=new_session)
        fh.close()
        self.procs.append((name, p, log_path))
        self.specs[name] = (cmd, log_path, env, cwd, new_session)
        return p

    def log_since_start(self, name: str) -> str:
        """What the process ``name`` wrote to its log since it was last started ('' if none)."""
        path = self.specs[name][1]
        try:
            with open(path, "rb") as fh:
                fh.seek(self.offsets.get(name, 0))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def restart_exited(self, check=None) -> list[str]:
        """Start again every process that has exited (same command and log); returns their names.

        ``check(name, returncode, log_text)``, when given, is called first for each exited process
        with its log since it was started; it may raise to stop the restarts (the exception
        propagates; nothing more is restarted).
        """
        restarted = []
        for i, (name, p, path) in enumerate(self.procs):
            if p.poll() is not None:
                if check is not None:
                    check(name, p.returncode, self.log_since_start(name))
                log.warning("%s exited with code %s; restarting it", name, p.returncode)
                cmd, log_path, env, cwd, new_session = self.specs[name]
                self.procs.pop(i)
                self.start(name, cmd, log_path, env, cwd, new_session)
                self.procs.insert(i, self.procs.pop())
                restarted.append(name)
        return restarted

    def check_alive(self) -> None:
        """Raise FlowerError naming any process that has exited, with its log's tail."""
        for name, p, path in self.procs:
            if p.poll() is not None:
                raise FlowerError(f"{name} exited with code {p.returncode}; log tail:\n{tail(path)}")

    def stop(self, grace: float = 5.0) -> None:
        """Terminate every process group, wait up to ``grace`` seconds, then kill.

        A second SIGTERM/SIGINT while stopping is ignored, so cleanup is not cut short.
        """
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                self._stop(grace)
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        else:
            self._stop(grace)

    def _stop(self, grace: float) -> None:
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:  # not a group leader: signal the process itself
                    p.terminate()
        deadline = time.monotonic() + grace
        for _, p, _ in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, p, _ in self.procs:
            try:  # also reap children left in the group (ServerApp / ClientApp processes)
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                if p.poll() is None:
                    p.kill()
            if p.poll() is None:
                p.wait(timeout=5)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def tail(path: Path, n: int = 30) -> str:
    """Last ``n`` lines of a log file (empty if absent)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_health(url: str, group: ProcessGroup, timeout: float = 60.0, ca: Path | None = None) -> None:
    """Wait until ``url`` answers HTTP 200; raise FlowerError if a process dies or on timeout.

    ``ca``: CA certificate to verify an ``https`` URL with.
    """
    ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        group.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:  # noqa: S310
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise FlowerError(f"{url} did not become healthy within {timeout:.0f} s")


@dataclass(frozen=True)
class TLS:
    """The developer's SuperLink TLS files (see :mod:`deploy.certs`): CA, server cert and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, folder: Path) -> "TLS":
        """``ca.pem``, ``superlink.pem`` and ``superlink.key`` in ``folder``.

        Raises:
            FileNotFoundError: naming each file that is missing.
        """
        from .certs import CA_CERT, SERVER_CERT, SERVER_KEY

        folder = Path(folder)
        tls = cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)
        missing = [str(p) for p in (tls.ca, tls.cert, tls.key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"TLS files missing: {', '.join(missing)} "
                                    "(create them with `fairsplit certs --out DIR`)")
        return tls


def start_superlink(group: ProcessGroup, port: int, log_path: Path, host: str = "127.0.0.1",
                    database: Path | None = None, tls: TLS | None = None,
                    node_auth: bool = True, extra: list[str] | None = None,
                    isolation: str = "subprocess") -> str:
    """Start ``flower-superlink`` on ``host:port`` and wait for ``/health``. Returns ``host:port``.

    ``isolation="process"``: the SuperLink starts no ServerApp process per run; the developer's
    long-lived executor (:func:`start_developer_executor`) serves every run. ``subprocess``
    (Flower's default): a fresh ``flwr-serverapp`` process per run.

    With ``tls`` the Fleet, Control and Runtime APIs are served over TLS; without it, insecure
    (``--insecure``; only for loopback tests). ``node_auth`` (TLS only) admits only SuperNodes
    whose public key was registered (:func:`register_supernode`). ``database``: SQLite file that
    keeps registrations and runs across SuperLink restarts. Runtime dependency installation is
    disabled: the app's code is the installed fairsplit.
    """
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--isolation", isolation]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert),
                "--ssl-keyfile", str(tls.key)]
        if node_auth:
            cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    cmd += extra or []
    env = _env()
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # start the ServerApp sooner
    group.start("flower-superlink", cmd, log_path, env)
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    wait_health(f"{'https' if tls else 'http'}://{probe}:{port}/health", group,
                ca=tls.ca if tls else None)
    return f"{probe}:{port}"


def register_supernode(flwr_home: Path, public_key: Path) -> int | None:
    """Register the auditor's SuperNode public key with the SuperLink (``flwr supernode register``).

    Returns the node ID, or None when the key was already registered (a SuperLink restarted
    with its database).

    Raises:
        FlowerError: the key is unreadable or the SuperLink refused it.
    """
    cmd = [_bin("flwr"), "supernode", "register", str(public_key), "fairsplit", "--format", "json"]
    res = subprocess.run(cmd, env=_env(flwr_home), capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        out = {}
    if out.get("success"):
        return int(out["node-id"])
    text = f"{out.get('error-message', '')} {res.stdout[-1000:]} {res.stderr[-1000:]}"
    if "already" in text.lower() or "exists" in text.lower():
        return None
    raise FlowerError(f"could not register the auditor's SuperNode key {public_key}: {text.strip()}")


def start_supernode(group: ProcessGroup, superlink: str, auditor_config: Path, log_path: Path,
                    port: int | None = None, isolation: str = "process",
                    root_certificates: Path | None = None, auth_key: Path | None = None,
                    extra: list[str] | None = None, new_session: bool = True) -> int:
    """Start the auditor's ``flower-supernode`` dialling out to ``superlink`` (``host:port``).

    With ``root_certificates`` (the developer's CA) the connection is TLS; without it insecure.
    ``auth_key`` is the auditor's SuperNode private key (node authentication, TLS only).
    ``isolation="process"`` (default): the SuperNode starts no ClientApp processes; the auditor's
    own executor (:mod:`auditor.executor`) takes tasks from its local Runtime API on ``port``.
    ``auditor_config`` is given as node config ``config``; it stays on the auditor's machine.
    Returns the Runtime API port.
    """
    port = port or free_port()
    # Flower's SuperNode, run through auditor.supernode: idle poll 0.2 s instead of a fixed 3 s
    cmd = [sys.executable, "-m", "fairsplit.auditor.supernode", "--superlink", superlink, "--port", str(port),
           "--isolation", isolation,
           "--node-config", f"config={json.dumps(str(Path(auditor_config).resolve()))}"]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
        if auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(auth_key)]
    cmd += extra or []
    group.start("flower-supernode", cmd, log_path, _env(), new_session=new_session)
    return port


def start_executor(group: ProcessGroup, runtime_port: int, auditor_config: Path, approved: list[str],
                   log_path: Path, new_session: bool = True, state_dir: Path | None = None) -> None:
    """Start the auditor's vetted, long-lived ClientApp executor (``python -m fairsplit.auditor.executor``);
    ``state_dir``: the auditor's state folder when its config names none."""
    cmd = [sys.executable, "-m", "fairsplit.auditor.executor", "--runtime-api-address",
           f"127.0.0.1:{runtime_port}", "--config", str(Path(auditor_config).resolve())]
    for h in approved:
        cmd += ["--approve", h]
    if state_dir is not None:
        cmd += ["--state-dir", str(Path(state_dir).resolve())]
    group.start("auditor-executor", cmd, log_path, _env(), new_session=new_session)


def start_developer_executor(group: ProcessGroup, superlink: str, root_certificates: Path | None,
                             log_path: Path) -> None:
    """Start the developer's long-lived ServerApp executor (``python -m fairsplit.developer.executor``) for a
    SuperLink started with ``isolation="process"``."""
    cmd = [sys.executable, "-m", "fairsplit.developer.executor", "--superlink", superlink]
    if root_certificates is not None:
        cmd += ["--root-certificates", str(Path(root_certificates).resolve())]
    group.start("developer-executor", cmd, log_path, _env())


def write_flwr_home(flwr_home: Path, superlink: str, root_certificates: Path | None = None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection named ``fairsplit``.

    TLS with ``root_certificates`` (the developer's CA), else ``insecure = true``.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "fairsplit"', "", "[superlink.fairsplit]",
             f'address = "{superlink}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def submit_run(flwr_home: Path, run_config: dict[str, object], log_path: Path,
               app_dir: Path = APP_DIR) -> int:
    """Submit the fairsplit Flower App (what ``flwr run`` does, through the Control API in this
    process: no CLI process per run) and return the run id.

    Raises:
        FlowerError: the SuperLink did not start the run (the reason is in the message).
    """
    from fairsplit.developer.flower_compat import start_run

    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_id = start_run(flwr_home, app_dir, run_config)
    except Exception as err:  # noqa: BLE001 - grpc/httpx errors, refused runs
        with open(log_path, "a") as fh:
            fh.write(f"submit {json.dumps(run_config)}: failed: {type(err).__name__}: {err}\n")
        raise FlowerError(f"run submission failed: {type(err).__name__}: {err}") from None
    with open(log_path, "a") as fh:
        fh.write(f"submit {json.dumps(run_config)}: run {run_id}\n")
    return run_id


def run_status(flwr_home: Path, run_id: int) -> str:
    """The run's status string (e.g. ``running``, ``finished:completed``), from the Control API
    in this process; ``unknown`` when the SuperLink cannot be asked."""
    from fairsplit.developer.flower_compat import run_status as _status

    try:
        return _status(flwr_home, run_id)
    except Exception as err:  # noqa: BLE001 - SuperLink busy or restarting
        log.debug("run status of %s: %s", run_id, err)
        return "unknown"


def wait_run(flwr_home: Path, run_id: int, group: ProcessGroup, timeout: float,
             done_file: Path | None = None, poll: float = 0.1, on_poll=None,
             error_file: Path | None = None, status_every: float = 5.0) -> str:
    """Wait until the run finishes; return its final status.

    The run's status is asked (Control API, in-process) every ``status_every`` seconds, and
    every ``poll`` seconds once ``done_file`` or ``error_file`` exists; ``on_poll`` is called
    every ``poll`` seconds.

    Raises:
        FlowerError: a Flower process died, or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    last_check = time.monotonic()
    while time.monotonic() < deadline:
        group.check_alive()
        if on_poll is not None:
            on_poll()
        done = any(f is not None and f.exists() for f in (done_file, error_file))
        if done or time.monotonic() - last_check > status_every:
            last_check = time.monotonic()
            status = run_status(flwr_home, run_id)
            if status.startswith("finished"):
                return status
        time.sleep(poll)
    raise FlowerError(f"run {run_id} did not finish within {timeout:.0f} s")
