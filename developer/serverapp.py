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

from fairsplit.developer.config import load_developer_file
from fairsplit.protocol.framing import pack, unpack

from .flower_compat import STALE_NODE_EXPIRY, quick_object_retries
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
    polls). Survives an auditor that disappears mid-round: if no reply came within
    ``resend_after`` seconds (the auditor may have restarted under the same node ID and lost the
    request), the same request is sent again to whichever auditor node is online then; the
    auditor answers a re-sent round exactly as the first time (its per-round state is kept by
    round). The first reply to any of the copies is taken. Gives up after ``reply_timeout``
    seconds per request.

    Re-sends are paced: after a send the next one is due ``resend_after`` seconds later. A
    transient error from Flower about the latest copy (the node missed its heartbeats, the reply
    expired, or the reply's payload did not arrive within ``resend_after`` seconds) brings that
    re-send forward to ``transient_delay`` seconds from then, at most once per ``resend_after``
    seconds; errors about older copies, or the same error seen again on later polls, change
    nothing. The warning about them is logged at most once per ``resend_after`` seconds.

    When more than one SuperNode is online (a SuperNode killed without deactivating stays online
    until Flower marks it offline, :data:`developer.flower_compat.STALE_NODE_EXPIRY` seconds after
    its last heartbeat), the channel waits, up to the node deadline, until exactly one is left.

    Args:
        grid: the ServerApp's Grid.
        node_timeout: seconds to wait for exactly one auditor SuperNode to be online.
        reply_timeout: seconds to wait for each reply, retries included.
        resend_after: seconds without a reply after which the request is sent again.
        poll: seconds between reply polls.
        transient_delay: seconds from a transient error to the re-send it brings forward.

    Raises:
        AuditorError: no SuperNode, or still more than one, after ``node_timeout`` seconds.
    """

    def __init__(self, grid: Grid, node_timeout: float = 120.0, reply_timeout: float = 600.0,
                 resend_after: float = 120.0, poll: float = 0.05, transient_delay: float = 2.0):
        self.grid = grid
        self.reply_timeout = reply_timeout
        self.resend_after = resend_after
        self.poll = poll
        self.transient_delay = transient_delay
        self.resends = 0
        self._warn_at = float("-inf")  # when the next transient-error warning may be logged
        self.node_id = self._wait_node(time.monotonic() + node_timeout)
        log.info("auditor SuperNode %s connected", self.node_id)

    def _wait_node(self, deadline: float) -> int:
        """The one online SuperNode's ID, polling every 0.2 s until ``deadline`` (monotonic s).

        Raises:
            AuditorError: none online, or more than one, at ``deadline`` (the message says how
                many and how long it waited).
        """
        start = time.monotonic()
        announced: list[int] | None = None
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) == 1:
                return nodes[0]
            if len(nodes) > 1 and nodes != announced:
                log.warning("%d SuperNodes online (%s); waiting for the stale one(s) to be marked "
                            "offline (Flower does so %.0f s after a node's last heartbeat)",
                            len(nodes), ", ".join(map(str, nodes)), STALE_NODE_EXPIRY)
                announced = nodes
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        waited = time.monotonic() - start
        if not nodes:
            raise AuditorError(f"no auditor SuperNode online after waiting {waited:.1f} s")
        raise AuditorError(
            f"expected exactly one auditor SuperNode, found {len(nodes)} online "
            f"({', '.join(map(str, nodes))}) after waiting {waited:.1f} s; a SuperNode that "
            f"was killed stays online until {STALE_NODE_EXPIRY:.0f} s after its last heartbeat")

    def submit(self, message_type: str, content: RecordDict) -> dict:
        """Push one request without waiting; returns the handle for :meth:`receive`."""
        now = time.monotonic()
        handle = {"type": message_type, "content": content, "ids": [],
                  "deadline": now + self.reply_timeout, "resend_at": now + self.resend_after,
                  "forwarded_at": float("-inf")}
        self._push(handle)
        return handle

    def _push(self, handle: dict) -> None:
        msg = Message(content=pack(handle["content"]), dst_node_id=self.node_id,
                      message_type=handle["type"])
        handle["ids"] += [m for m in self.grid.push_messages([msg]) if m]

    def _transient(self, handle: dict, reply: Message) -> None:
        """A transient error reply: bring the re-send forward (paced), warn (rate-limited)."""
        now = time.monotonic()
        about = reply.metadata.reply_to_message_id
        latest = not handle["ids"] or not about or about == handle["ids"][-1]
        if latest and now - handle["forwarded_at"] >= self.resend_after:
            handle["forwarded_at"] = now
            handle["resend_at"] = min(handle["resend_at"], now + self.transient_delay)
        if now >= self._warn_at:
            self._warn_at = now + self.resend_after
            log.warning("auditor unavailable (%s); waiting for it to return", reply.error.reason)

    def receive(self, handle: dict) -> RecordDict:
        """Wait for the reply to a submitted request, re-sending as described above.

        Raises:
            AuditorError: an error reply from the auditor, or no reply within ``reply_timeout``
                seconds.
        """
        while True:
            for reply in self.grid.pull_messages(handle["ids"]):
                if not reply.has_error():
                    return unpack(reply.content)
                if reply.error.code not in _TRANSIENT:
                    raise AuditorError(f"auditor refused the request: {reply.error.reason}")
                self._transient(handle, reply)
            now = time.monotonic()
            if now >= handle["deadline"]:
                raise AuditorError(f"no reply from the auditor within {self.reply_timeout:.0f} s "
                                   f"({len(handle['ids'])} copies of the request sent)")
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
    rc = context.run_config
    # a pulled reply whose payload never arrives counts as lost after resend-after seconds
    quick_object_retries(max_time=float(rc.get("resend-after", 120)))
    try:
        f = load_developer_file(str(cfg_path))
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
