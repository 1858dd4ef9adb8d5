"""The auditor's own, long-lived ClientApp executor: runs only vetted code, keeps its model warm.

In Flower, whoever submits a run ships the app bundle (FAB) that SuperNodes execute. The developer
submits runs, so a modified app could read the auditor's data and send it back. Open-source
Flower's app verification (SuperNode ``--trusted-entities``) only accepts bundles signed through
Flower Hub, so fairsplit does not let the SuperNode start app processes at all:

* the auditor's SuperNode runs with ``--isolation process`` (it starts no ClientApp itself);
* this executor, started by the auditor, takes each task from the SuperNode's local Runtime API
  (the API Flower's own SuperExec uses), checks the task's FAB against the SHA-256 the auditor
  pinned (``approved_app_sha256`` in its config, by default the hash of the app folder shipped
  with the auditor's installed fairsplit), and **refuses** any other bundle with an error reply —
  before the auditor's config is read or any data file is opened;
* even an approved bundle's code is not imported: the executor answers with the auditor's own
  installed ClientApp (:mod:`auditor.clientapp`), the code the auditor reviewed.

Payloads cross Flower framed (:mod:`protocol.framing`: one array per record instead of one per
tensor); the executor unpacks requests before the ClientApp sees them and packs its replies.

Because this process lives as long as the auditor does, the backbone, the LoRA model and the
decoded data are built once and reused across messages (a SuperNode in ``subprocess`` isolation
would start a fresh ClientApp process, import torch and rebuild everything for every message).

Runs one task at a time. Every failure while answering becomes Flower's error reply to the
developer; the executor itself keeps running.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message

from .flower_compat import (
    ErrorCode,
    HeartbeatSender,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    acquire_clientapp_task,
    error_reply,
    make_simple_http_retry_invoker,
    make_task_heartbeat_fn_http,
    pull_task_input,
    push_message,
    push_task_output,
)
from fairsplit.protocol.framing import pack, unpack
from fairsplit.protocol.privacy import PublicRefusal, public_error_text

__all__ = ["AppNotApproved", "VettedExecutor", "fab_sha256"]

log = logging.getLogger(__name__)

class AppNotApproved(PublicRefusal):
    """The run's app bundle is not the build the auditor approved (its text names only the
    bundle's hash and the run id, so it crosses as written)."""

    code = "E_APP"


def fab_sha256(app_dir: Path) -> str:
    """SHA-256 (hex) of the FAB that ``flwr run app_dir`` submits.

    Flower builds bundles reproducibly (fixed zip timestamps, sorted files), so the hash of a
    reviewed app folder is known before any run.

    Raises:
        FileNotFoundError: ``app_dir`` has no ``pyproject.toml``.
    """
    import warnings

    from .flower_compat import build_fab_from_disk

    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} is not a Flower App folder (no pyproject.toml)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pathspec's, inside Flower's build
        return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()


class VettedExecutor:
    """Takes ClientApp tasks from the auditor's SuperNode and answers them in this process.

    Args:
        runtime_api_address: the SuperNode's local Runtime API, ``host:port`` (its ``--port``;
            loopback, plain HTTP as between Flower's own SuperNode and SuperExec).
        approved_sha256: FAB hashes the auditor accepts (hex); anything else is refused.
        handler: ``(message, context) -> reply``: the auditor's installed ClientApp.
        node_config: overrides ``context.node_config`` (the auditor's config path), so the
            answer never depends on what the SuperNode was told.
        poll_interval: seconds between task polls when idle.
        on_refusal: called with (run_id, fab_hash) for each refused bundle (for logs/tests).

    Raises:
        ValueError: no approved hash given.
    """

    def __init__(self, runtime_api_address: str, approved_sha256: set[str],
                 handler: Callable[[Message, Context], Message],
                 node_config: dict | None = None, poll_interval: float = 0.1,
                 on_refusal: Callable[[int, str], None] | None = None):
        if not approved_sha256:
            raise ValueError("the auditor must approve at least one app hash")
        self.address = runtime_api_address
        self.approved = {h.lower() for h in approved_sha256}
        self.handler = handler
        self.node_config = node_config
        self.poll_interval = poll_interval
        self.on_refusal = on_refusal
        self.handled = 0
        self.refused = 0
        self._client = self._make_client([RuntimeVersionHttpInterceptor(component_name="SuperExec")])

    def _make_client(self, interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())

    def poll_once(self) -> bool:
        """Take and answer at most one pending task; returns whether there was one."""
        task = acquire_clientapp_task(self._client)
        if task is None:
            return False
        self._run_task(*task)
        return True

    def serve(self, stop: threading.Event | None = None) -> None:
        """Answer tasks until ``stop`` is set (or forever)."""
        stop = stop or threading.Event()
        log.info("auditor executor: serving tasks from %s; approved app(s) %s", self.address,
                 ", ".join(h[:12] for h in sorted(self.approved)))
        while not stop.is_set():
            try:
                if self.poll_once():
                    continue
            except Exception as err:  # noqa: BLE001 - SuperNode restarting: retry, keep running
                log.warning("auditor executor: %s: %s", type(err).__name__, err)
                stop.wait(1.0)
            stop.wait(self.poll_interval)

    def _run_task(self, token: str, task_fab_hash: str) -> None:
        client = self._make_client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                    RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "unknown failure"
        t0 = t_pulled = t_handled = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            t_pulled = time.perf_counter()
            content_hash = hashlib.sha256(fab.content).hexdigest()
            if content_hash not in self.approved or task_fab_hash.lower() not in self.approved:
                self.refused += 1
                if self.on_refusal is not None:
                    self.on_refusal(run.run_id, content_hash)
                raise AppNotApproved(
                    f"the auditor refuses app bundle sha256 {content_hash} (run {run.run_id}): "
                    "it is not the build the auditor approved; none of its code was run and it "
                    "caused no read of the auditor's data")
            if self.node_config is not None:
                context.node_config.clear()
                context.node_config.update(self.node_config)
            message.content = unpack(message.content)  # PayloadError → error reply
            reply = self.handler(message, context)
            t_handled = time.perf_counter()
            if reply.has_content():
                reply.content = pack(reply.content)
            status, details = SubStatus.COMPLETED, ""
            self.handled += 1
        except Exception as err:  # noqa: BLE001 - becomes the developer's error reply
            log.error("auditor executor: %s: %s", type(err).__name__, err)
            details = public_error_text(err)  # a fixed text per error class: nothing data-dependent
            if message is not None:
                reply = error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
                log.info("auditor executor: task %s in %.2f s (%s; pull %.2f s, answer %.2f s, "
                         "push %.2f s)", message.metadata.message_type if message is not None else "?",
                         time.perf_counter() - t0, status, max(t_pulled - t0, 0),
                         max(t_handled - t_pulled, 0), time.perf_counter() - max(t_handled, t_pulled))


def serve_auditor(runtime_api_address: str, config_path: Path, approved_sha256: set[str],
                  stop: threading.Event | None = None, poll_interval: float = 0.1,
                  state_dir: Path | None = None) -> None:
    """Serve the auditor's installed ClientApp (:mod:`auditor.clientapp`) until ``stop``.

    ``state_dir``: the auditor's state folder when its config names none (the launcher's
    default, :func:`auditor.state.default_state_dir`). Waits for the SuperNode's Runtime API to
    come up.

    Raises:
        ValueError: an empty approval set.
        auditor.state.PrivacyStateError: the privacy state is damaged, incomplete or missing
            under DP: the executor does not serve.
    """
    from .clientapp import app, warm_up
    from .state import PrivacyStateError

    try:  # build the model and load the data before the first request (not per message)
        warm_up(config_path, state_dir)
    except PrivacyStateError:
        raise
    except Exception as err:  # noqa: BLE001 - requests will then get the error as their reply
        log.error("auditor executor: warm-up failed: %s: %s", type(err).__name__, err)
    node_config = {"config": str(Path(config_path).resolve())}
    if state_dir is not None:
        node_config["state-dir"] = str(Path(state_dir).resolve())
    executor = VettedExecutor(runtime_api_address, approved_sha256,
                              lambda m, c: app(message=m, context=c),
                              node_config=node_config, poll_interval=poll_interval)
    executor.serve(stop)


def main(argv: list[str] | None = None) -> None:
    """``python -m fairsplit.auditor.executor --runtime-api-address H:P --config aud.toml --approve SHA``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--approve", action="append", required=True, help="approved FAB sha256")
    p.add_argument("--poll-interval", type=float, default=0.1)
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the auditor's state folder when its config names none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per 50 ms poll otherwise
    serve_auditor(args.runtime_api_address, args.config, set(args.approve),
                  poll_interval=args.poll_interval, state_dir=args.state_dir)


if __name__ == "__main__":
    main()
