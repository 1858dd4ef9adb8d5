"""The developer's Flower ServerApp: drives the rounds, talks to the auditor's SuperNode.

Run config keys (``flwr run ... --run-config``): ``developer-config`` (path to the developer's
TOML on the developer's machine), ``out-dir`` (where results are written), ``node-timeout``
(seconds to wait for the auditor's SuperNode to register), ``reply-timeout`` (seconds to wait for
one reply).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from protocol.config import load_developer_file

from .loop import AuditorError, run_experiment
from .results import atomic_write_json

__all__ = ["FlowerChannel", "app"]

log = logging.getLogger(__name__)

app = ServerApp()


class FlowerChannel:
    """:class:`developer.loop.AuditorChannel` over Flower's Grid, to one auditor SuperNode.

    Args:
        grid: the ServerApp's Grid.
        node_timeout: seconds to wait for exactly one SuperNode to register.
        reply_timeout: seconds to wait for each reply.
    """

    def __init__(self, grid: Grid, node_timeout: float = 120.0, reply_timeout: float = 600.0):
        self.grid = grid
        self.reply_timeout = reply_timeout
        deadline = time.monotonic() + node_timeout
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = list(grid.get_node_ids())
            if nodes:
                break
            time.sleep(0.5)
        if len(nodes) != 1:
            raise AuditorError(
                f"expected exactly one auditor SuperNode after {node_timeout:.0f} s, found {len(nodes)}"
            )
        self.node_id = nodes[0]
        log.info("auditor SuperNode %s connected", self.node_id)

    def send(self, message_type: str, content: RecordDict) -> RecordDict:
        """Send one message and wait for the reply. Raises AuditorError on error or timeout."""
        msg = Message(content=content, dst_node_id=self.node_id, message_type=message_type)
        replies = list(self.grid.send_and_receive([msg], timeout=self.reply_timeout))
        if not replies:
            raise AuditorError(f"no reply from the auditor within {self.reply_timeout:.0f} s")
        reply = replies[0]
        if reply.has_error():
            raise AuditorError(f"auditor refused the request: {reply.error.reason}")
        return reply.content


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point run by the SuperLink for each submitted run."""
    cfg_path = context.run_config.get("developer-config")
    out_dir = context.run_config.get("out-dir")
    if not cfg_path or not out_dir:
        raise ValueError("run config needs 'developer-config' and 'out-dir'")
    out = Path(str(out_dir))
    try:
        f = load_developer_file(str(cfg_path))
        channel = FlowerChannel(grid, float(context.run_config.get("node-timeout", 120)),
                                float(context.run_config.get("reply-timeout", 600)))
        run_experiment(f.experiment, f.developer, channel, out, transport="flower")
    except Exception as err:
        # The launcher reads this to tell the user why the run failed (the run's status only
        # says "failed"). It holds the error text only, never data.
        atomic_write_json(out / "error.json", {"error": type(err).__name__, "message": str(err)})
        raise
