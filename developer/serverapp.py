"""The developer's Flower ServerApp: drives the rounds, talks to the auditor's SuperNode.

Run config keys (``flwr run ... --run-config``): ``developer-config`` (path to the developer's
TOML on the developer's machine), ``out-dir`` (where results are written), ``node-timeout``
(seconds to wait for the auditor's SuperNode to register), ``reply-timeout`` (seconds to wait for
one reply, retries included), ``resend-after`` (seconds without a reply before the request is
sent again), ``resume`` (continue from ``out-dir``'s checkpoint).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from protocol.config import load_developer_file
from protocol.framing import pack, unpack

from .flower_compat import quick_object_retries
from .loop import AuditorError, run_experiment
from .results import atomic_write_json

__all__ = ["FlowerChannel", "app"]

log = logging.getLogger(__name__)

app = ServerApp()



#: Error codes Flower's SuperLink uses when the destination node or the reply went away.
_TRANSIENT = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
              ErrorCode.MESSAGE_UNAVAILABLE}


class FlowerChannel:
    """:class:`developer.loop.AuditorChannel` over Flower's Grid, to one auditor SuperNode.

    Each record crosses Flower framed as one array (:mod:`protocol.framing`): a few objects per
    message instead of one per tensor. Polls for the reply every ``poll`` seconds (Flower's ``send_and_receive`` sleeps 3 s between
    polls). Survives an auditor that disappears mid-round: if Flower reports the node unavailable
    (it missed its heartbeats), or no reply came within ``resend_after`` seconds (the auditor may
    have restarted under the same node ID and lost the request), the same request is sent again
    to whichever auditor node is registered then; the auditor answers a re-sent round exactly as
    the first time (its per-round state is kept by round). The first reply to any of the copies
    is taken. Gives up after ``reply_timeout`` seconds per request.

    Args:
        grid: the ServerApp's Grid.
        node_timeout: seconds to wait for the auditor's SuperNode to register.
        reply_timeout: seconds to wait for each reply, retries included.
        resend_after: seconds without a reply after which the request is sent again.
        poll: seconds between reply polls.

    Raises:
        AuditorError: no SuperNode within ``node_timeout``, or more than one.
    """

    def __init__(self, grid: Grid, node_timeout: float = 120.0, reply_timeout: float = 600.0,
                 resend_after: float = 120.0, poll: float = 0.05):
        self.grid = grid
        self.reply_timeout = reply_timeout
        self.resend_after = resend_after
        self.poll = poll
        self.resends = 0
        self.node_id = self._wait_node(time.monotonic() + node_timeout)
        log.info("auditor SuperNode %s connected", self.node_id)

    def _wait_node(self, deadline: float) -> int:
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = list(self.grid.get_node_ids())
            if nodes:
                break
            time.sleep(0.2)
        if len(nodes) != 1:
            raise AuditorError(
                f"expected exactly one auditor SuperNode, found {len(nodes)} "
                f"(waited until the timeout)")
        return nodes[0]

    def submit(self, message_type: str, content: RecordDict) -> dict:
        """Push one request without waiting; returns the handle for :meth:`receive`."""
        now = time.monotonic()
        handle = {"type": message_type, "content": content, "ids": [],
                  "deadline": now + self.reply_timeout, "resend_at": now + self.resend_after}
        self._push(handle)
        return handle

    def _push(self, handle: dict) -> None:
        msg = Message(content=pack(handle["content"]), dst_node_id=self.node_id,
                      message_type=handle["type"])
        handle["ids"] += [m for m in self.grid.push_messages([msg]) if m]

    def receive(self, handle: dict) -> RecordDict:
        """Wait for the reply to a submitted request, re-sending as described above.

        Raises:
            AuditorError: an error reply from the auditor, or no reply within ``reply_timeout``.
        """
        while True:
            for reply in self.grid.pull_messages(handle["ids"]):
                if not reply.has_error():
                    return unpack(reply.content)
                if reply.error.code not in _TRANSIENT:
                    raise AuditorError(f"auditor refused the request: {reply.error.reason}")
                log.warning("auditor unavailable (%s); waiting for it to return", reply.error.reason)
                handle["resend_at"] = min(handle["resend_at"], time.monotonic() + 2.0)
            now = time.monotonic()
            if now >= handle["deadline"]:
                raise AuditorError(f"no reply from the auditor within {self.reply_timeout:.0f} s")
            if now >= handle["resend_at"]:
                self.node_id = self._wait_node(handle["deadline"])
                self.resends += 1
                log.warning("re-sending the %s request to auditor node %s (attempt %d)",
                            handle["type"], self.node_id, len(handle["ids"]) + 1)
                self._push(handle)
                handle["resend_at"] = time.monotonic() + self.resend_after
                continue
            time.sleep(self.poll)

    def send(self, message_type: str, content: RecordDict) -> RecordDict:
        """Send one message and wait for its reply (:meth:`submit` + :meth:`receive`)."""
        return self.receive(self.submit(message_type, content))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point run by the SuperLink for each submitted run."""
    cfg_path = context.run_config.get("developer-config")
    out_dir = context.run_config.get("out-dir")
    if not cfg_path or not out_dir:
        raise ValueError("run config needs 'developer-config' and 'out-dir'")
    out = Path(str(out_dir))
    quick_object_retries()
    try:
        f = load_developer_file(str(cfg_path))
        rc = context.run_config
        channel = FlowerChannel(grid, float(rc.get("node-timeout", 120)),
                                float(rc.get("reply-timeout", 600)),
                                float(rc.get("resend-after", 120)))
        run_experiment(f.experiment, f.developer, channel, out, transport="flower",
                       resume=bool(rc.get("resume", False)))
    except Exception as err:
        # The launcher reads this to tell the user why the run failed (the run's status only
        # says "failed"). It holds the error text only, never data.
        atomic_write_json(out / "error.json", {"error": type(err).__name__, "message": str(err)})
        raise
