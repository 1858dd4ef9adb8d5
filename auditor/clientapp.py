"""The auditor's Flower ClientApp: serves ``evaluate`` and ``train`` messages with :class:`AuditorService`.

The SuperNode is started with ``--node-config "config='/path/auditor.toml'"``: the config path
(with the auditor's data paths) never leaves the auditor's machine. An exception raised while
handling a message (bad payload, experiment mismatch, too small a group) becomes Flower's error
reply with a fixed code and message per error class (:func:`protocol.privacy.public_error_text`,
applied by the executor); the full error stays in the auditor's log.

The host (:class:`auditor.host.AuditorHost`) is cached per process, so the long-lived executor
(SuperNode ``--isolation process``) reuses the models and the decoded data across messages and
across runs: its own experiment and, with a ``[tune]`` table, every experiment of its search space.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fairsplit.auditor.config import load_auditor_file

from .host import AuditorHost
from .state import default_state_dir

__all__ = ["app", "warm_up"]

log = logging.getLogger(__name__)
_HOSTS: dict[tuple, AuditorHost] = {}  # (config path, state_dir) → host

app = ClientApp()


def _host_for(path: str, state_dir: str | None = None) -> AuditorHost:
    """The host of the auditor's config at ``path``; when the config names no ``state_dir``, the
    launcher's ``state_dir``, else :func:`auditor.state.default_state_dir` of its ``superlink``."""
    if (path, state_dir) not in _HOSTS:
        f = load_auditor_file(path)
        cfg = f.auditor
        if cfg.state_dir is None:  # the launcher's choice, else the default for its SuperLink
            cfg = cfg.model_copy(update={"state_dir": Path(state_dir) if state_dir
                                         else default_state_dir(cfg.superlink)})
        _HOSTS[(path, state_dir)] = AuditorHost(f.experiment, cfg, f.tune)
    return _HOSTS[(path, state_dir)]


def _host(context: Context) -> AuditorHost:
    path = context.node_config.get("config")
    if not isinstance(path, str) or not path:
        raise ValueError("SuperNode node-config lacks 'config' (path to the auditor's TOML)")
    state_dir = context.node_config.get("state-dir")
    return _host_for(path, state_dir if isinstance(state_dir, str) and state_dir else None)


def warm_up(config_path, state_dir: Path | None = None) -> None:
    """Build the auditor's model and load its data now (a long-lived process), not at the first
    request. Reads only the auditor's own config and data. ``state_dir``: the auditor's state
    folder when its config names none (:func:`auditor.state.default_state_dir`).

    Raises:
        protocol.config.ConfigError / protocol.data.DataError: unusable config or data.
        auditor.state.PrivacyStateError: the privacy state is damaged or incomplete.
        protocol.metrics.SmallGroupError: an evaluation group below ``min_group_size`` (every
            request is then refused with ``E_SMALL_GROUP``).
    """
    host = _host_for(str(Path(config_path).resolve()), str(state_dir) if state_dir else None)
    host.base.model  # noqa: B018 - builds the model
    host.check()  # loads the data; small groups are refused now, not after the developer trained


def _answer(msg: Message, context: Context) -> Message:
    # context.state is the SuperNode's per-run state: it stays on the auditor's machine.
    reply = _host(context).handle(msg.metadata.message_type, msg.content, context.state,
                                     run_id=context.run_id)
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the developer's adapter + head on the auditor's val/test split."""
    return _answer(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the method's fairness signal (or unlearning update), plus evaluation if asked."""
    return _answer(msg, context)
