"""The developer's long-lived ServerApp executor: one process serves every run of a deployment.

Flower's SuperLink, in its default ``subprocess`` isolation, starts a fresh ``flwr-serverapp``
process for each run: it imports torch, timm, peft and flwr, builds the model and decodes the
data again, about 12 s before the first request (``docs/benchmarks.md``). A study of 30 trials
would pay that 30 times. With ``--isolation process`` the SuperLink starts no ServerApp itself;
this executor takes each run's ServerApp task from the SuperLink's Runtime API and runs the
developer's installed ServerApp (:func:`developer.serverapp.main`) in this process, one run at a
time. Imports stay loaded and the decoded training split is kept (:func:`developer.trainer.developer_data`).

It is the developer's own process on the developer's machine, running the developer's own
installed code, the counterpart of the auditor's :mod:`auditor.executor`. A run that fails is
reported to Flower as failed (its ``error.json`` is written by the ServerApp); the executor keeps
serving.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from . import flower_compat as compat

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(superlink: str, root_certificates: Path | None, stop: threading.Event | None = None,
          poll_interval: float = 0.1) -> None:
    """Run ServerApp tasks from the SuperLink at ``superlink`` (``host:port``) until ``stop``.

    ``root_certificates``: the developer's CA (TLS), or None for an insecure SuperLink.
    """
    from .serverapp import main as serverapp_main

    stop = stop or threading.Event()
    certs = Path(root_certificates).read_bytes() if root_certificates is not None else None
    source = compat.TaskSource(superlink, certs)
    log.info("developer executor: serving ServerApp tasks from %s", superlink)
    try:
        while not stop.is_set():
            try:
                token = source.acquire()
            except Exception as err:  # noqa: BLE001 - SuperLink restarting: keep polling
                log.warning("developer executor: %s: %s", type(err).__name__, err)
                stop.wait(1.0)
                continue
            if token is None:
                stop.wait(poll_interval)
                continue
            _run_task(source, token, serverapp_main)
    finally:
        source.close()


def _run_task(source: "compat.TaskSource", token: str, serverapp_main) -> None:
    t0 = time.perf_counter()
    task = None
    status, details = compat.FAILED, "ServerApp failed"
    try:
        task = compat.ServerAppTask(source, token)
        log.info("developer executor: run %s started", task.run_id)
        serverapp_main(task.grid, task.context)
        status, details = compat.COMPLETED, ""
    except Exception as err:  # noqa: BLE001 - the run fails, the executor keeps serving
        log.error("developer executor: run failed: %s: %s", type(err).__name__, err)
        details = f"ServerApp failed with exception: {err}"
    finally:
        if task is not None:
            try:
                task.finish(status, details)
            except Exception as err:  # noqa: BLE001
                log.error("developer executor: could not report the run's outcome: %s", err)
            log.info("developer executor: run %s %s in %.2f s", task.run_id, status,
                     time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    """``python -m fairsplit.developer.executor --superlink H:P [--root-certificates ca.pem]``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--superlink", required=True, help="the SuperLink's host:port")
    p.add_argument("--root-certificates", type=Path, default=None, help="CA certificate (TLS)")
    p.add_argument("--poll-interval", type=float, default=0.1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve(args.superlink, args.root_certificates, poll_interval=args.poll_interval)


if __name__ == "__main__":
    main()
