"""Every Flower internal the developer's side uses (flwr 1.41), in one place.

Flower's public API covers writing a ServerApp and the ``flwr`` CLI. fairsplit also needs, on the
developer's machine:

* a long-lived ServerApp executor (:mod:`developer.executor`): it takes ServerApp tasks from the
  SuperLink's Runtime API (SuperLink ``--isolation process``) as Flower's own ``flwr-serverapp``
  process does, but serves every run in one process, so imports, the backbone and the decoded
  data stay warm between runs;
* run submission and status through the Control API in-process (what ``flwr run`` and ``flwr
  list`` do, without starting a CLI process per call);
* faster object retries in the ServerApp's grid, with a bound on a reply whose payload never
  arrives;
* when the SuperLink marks a SuperNode killed without deactivating offline.

When Flower changes these internals, this module is what to adapt.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from flwr.app import Context
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["COMPLETED", "FAILED", "STALE_NODE_EXPIRY", "ServerAppTask", "TaskSource",
           "quick_object_retries", "run_status", "start_run"]

COMPLETED, FAILED = SubStatus.COMPLETED, SubStatus.FAILED


#: Seconds after its last heartbeat at which the SuperLink marks a SuperNode offline
#: (``HEARTBEAT_PATIENCE`` × the SuperNode's default heartbeat interval). A SuperNode killed
#: without deactivating (``kill -9``) is listed by ``Grid.get_node_ids()`` until then.
STALE_NODE_EXPIRY: float = float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL)

_PULL_OBJECTS = None  # Flower's own ``http_grid.pull_objects``, before the patch


def quick_object_retries(max_time: float | None = None) -> None:
    """Retry reply objects not yet uploaded after 50 ms instead of Flower's 1 s (the reply's
    header can reach the SuperLink before its payload), and give up on a reply's payload after
    ``max_time`` seconds (default: Flower's 2 h; 500 tries at the 0.5 s cap take about 250 s)
    instead: Flower's Grid then returns that reply as a ``MESSAGE_UNAVAILABLE`` error, so the
    caller can send its request again. Affects only this process; a later call replaces the
    earlier settings.

    Raises:
        ValueError: ``max_time`` is not a positive number of seconds.
    """
    import flwr.superlink.grid.http_grid as http_grid

    global _PULL_OBJECTS
    if max_time is not None and not max_time > 0:
        raise ValueError(f"max_time must be > 0 seconds, got {max_time}")
    if _PULL_OBJECTS is None:
        current = http_grid.pull_objects
        _PULL_OBJECTS = current.func if isinstance(current, functools.partial) else current
    extra = {} if max_time is None else {"max_time": max_time}
    http_grid.pull_objects = functools.partial(_PULL_OBJECTS, initial_backoff=0.05,
                                               backoff_cap=0.5, **extra)


class TaskSource:
    """Polls the SuperLink's Runtime API for ServerApp tasks (what Flower's SuperExec does).

    Args:
        address: the SuperLink's ``host:port`` (Runtime API on the same port as Fleet/Control).
        root_certificates: PEM bytes of the CA (TLS), or None (insecure).
    """

    def __init__(self, address: str, root_certificates: bytes | None):
        self.address, self.certs = address, root_certificates
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=root_certificates is None,
            root_certificates=root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> str | None:
        """The token of a pending ServerApp task, or None."""
        res = self._client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.SERVER_APP], agentapp_fab_hashes=[]))
        return res.token if res.HasField("task") and res.token else None

    def close(self) -> None:
        self._client.close()


class ServerAppTask:
    """One acquired ServerApp task: its Grid, Context and run config; report the outcome with
    :meth:`finish` (Flower then marks the run ``finished:completed`` or ``finished:failed``)."""

    def __init__(self, source: TaskSource, token: str):
        from flwr.common.config import get_fused_config_from_fab
        from flwr.superlink.grid import HttpGrid

        self.grid = HttpGrid(runtime_api_address=source.address, insecure=source.certs is None,
                             root_certificates=source.certs, token=token)
        self.heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(self.grid._runtime_client))
        self.heartbeat.start()
        res = self.grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        self.context: Context = context_from_proto(res.context)
        self.run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        self.fab_sha256 = hashlib.sha256(fab.content).hexdigest()
        self.grid.set_run(self.run)
        self.context.run_config = get_fused_config_from_fab(fab.content, self.run)

    @property
    def run_id(self) -> int:
        return int(self.run.run_id)

    def finish(self, sub_status: str, details: str) -> None:
        """Push the task's outcome and release the connection."""
        try:
            self.grid._retry_invoker.max_tries = 1
            from flwr.app import RecordDict

            self.context.state = RecordDict()
            self.grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(
                context=context_to_proto(self.context), sub_status=sub_status, details=details))
        finally:
            self.heartbeat.stop()
            self.grid.close()


def _control_client(flwr_home: Path):
    """A Control API client for ``$FLWR_HOME``'s default SuperLink connection."""
    import os

    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    import contextlib
    import io

    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # flwr prints "Using SuperLink: ..."
            return init_http_client_from_connection(read_superlink_connection(None))
    finally:
        if old is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old


def start_run(flwr_home: Path, app_dir: Path, run_config: dict[str, object]) -> int:
    """Submit the Flower App in ``app_dir`` with ``run_config`` (``flwr run``, in-process).

    Returns the run id. Raises RuntimeError when the SuperLink does not start the run.
    """
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=E0611
    from flwr.supercore.fab import Fab

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pathspec's, inside Flower's build
        fab_bytes = build_fab_from_disk(Path(app_dir))
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    client = _control_client(flwr_home)
    try:
        res = client.StartRun(StartRunRequest(fab=fab_to_proto(fab),
                                              override_config=user_config_to_proto(dict(run_config)),
                                              federation="", app_spec=""))
    finally:
        client.close()
    if not res.HasField("run_id"):
        raise RuntimeError("the SuperLink did not start the run")
    return int(res.run_id)


def run_status(flwr_home: Path, run_id: int) -> str:
    """``status`` or ``status:sub_status`` of a run (as ``flwr list`` prints it), in-process."""
    from flwr.common.serde import run_from_proto as _run
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

    client = _control_client(flwr_home)
    try:
        res = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    for proto in res.run_dict.values():
        st = _run(proto).status
        return f"{st.status}:{st.sub_status}" if st.sub_status else st.status
    return "unknown"
