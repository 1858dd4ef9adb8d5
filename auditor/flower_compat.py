"""Every Flower internal the auditor's side uses (flwr 1.41), in one place.

Flower's public API covers writing a ClientApp; the auditor also needs:

* its vetted executor (:mod:`auditor.executor`): take ClientApp tasks from the SuperNode's local
  Runtime API (SuperNode ``--isolation process``), pull the message, push the reply and the
  task's status, as Flower's own ``flwr-clientapp`` process does;
* the bundle hash Flower computes for ``flwr run`` (:func:`build_fab_from_disk`);
* a shorter idle poll in the SuperNode loop (:func:`patch_supernode_loop`, :mod:`auditor.supernode`);
* why the SuperNode exited, from Flower's exit codes in its log (:func:`classify_supernode_exit`).

When Flower changes these internals, this module is what to adapt.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.error.base import ApiErrorCode
from flwr.supercore.exit.exit_code import ExitCode
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

__all__ = ["ErrorCode", "HeartbeatSender", "PULL_MAX_TIME", "RuntimeHttpClient",
           "RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor", "SubStatus",
           "PERMANENT_EXIT_CODES", "SupernodeExit", "acquire_clientapp_task", "build_fab_from_disk",
           "classify_supernode_exit", "error_reply",
           "make_simple_http_retry_invoker", "make_task_heartbeat_fn_http", "patch_supernode_loop",
           "pull_task_input", "push_message", "push_task_output"]


def acquire_clientapp_task(client: RuntimeHttpClient) -> tuple[str, str] | None:
    """``(token, fab_hash)`` of a pending ClientApp task at the SuperNode, or None."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                agentapp_fab_hashes=[]))
    if not (res.HasField("task") and res.token):
        return None
    return res.token, res.task.fab_hash


def error_reply(message: Message, code: int, reason: str) -> Message:
    """Flower's error reply to ``message``."""
    return Message(Error(code=code, reason=reason), reply_to=message)


#: Seconds to wait for a task's payload. A developer that dies while uploading a request leaves
#: a task whose objects never arrive; the executor gives it up (the developer re-sends) instead
#: of blocking every later task for Flower's default of two hours.
PULL_MAX_TIME = 30.0


def pull_task_input(client: RuntimeHttpClient):
    """Flower's ``run_clientapp.pull_task_input`` with a 50 ms first retry instead of 1 s, and a
    payload deadline of :data:`PULL_MAX_TIME` seconds.

    The SuperNode hands out a task as soon as the message's header arrives, while it is still
    fetching the payload from the SuperLink; Flower's default backoff then waits a whole second.
    Returns (message, context, run, fab).

    Raises:
        RuntimeError: the SuperNode has no message for the task.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("no message received from the SuperNode's Runtime API")
    node = Node(node_id=context.node_id)
    tree = msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.05, backoff_cap=0.5, max_time=PULL_MAX_TIME)
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def patch_supernode_loop(poll_cap_sleep) -> None:
    """Make ``flwr.supernode.start_client_internal`` sleep through ``poll_cap_sleep`` (a stand-in
    for the ``time`` module) and retry a payload object after 50 ms instead of 1 s."""
    import flwr.supernode.start_client_internal as loop

    loop.time = poll_cap_sleep
    loop.pull_objects = functools.partial(loop.pull_objects, initial_backoff=0.05, backoff_cap=0.5)


# -- why a SuperNode exited (read from its log) --------------------------------------------------

#: Flower exit codes (``flwr.supercore.exit.ExitCode``) after which restarting the SuperNode with
#: the same command cannot help: a bad key file, node auth without TLS, bad trusted entities, an
#: unparsable address, TLS options that do not fit, a missing certificate file, an incompatible
#: Flower version. Flower's own process always exits with status 1; the code is in its log.
PERMANENT_EXIT_CODES = frozenset({
    ExitCode.SUPERNODE_NODE_AUTH_KEY_INVALID, ExitCode.SUPERNODE_STARTED_WITHOUT_TLS_BUT_NODE_AUTH_ENABLED,
    ExitCode.SUPERNODE_INVALID_TRUSTED_ENTITIES, ExitCode.COMMON_ADDRESS_INVALID,
    ExitCode.COMMON_TLS_NOT_SUPPORTED, ExitCode.COMMON_TLS_ROOT_CERTIFICATES_INCOMPATIBLE,
    ExitCode.COMMON_PATH_INVALID, ExitCode.COMMON_TLS_SERVER_CERTIFICATES_INVALID,
    ExitCode.RUNTIME_VERSION_INCOMPATIBLE})

#: TLS failures under ``SUPERNODE_CONNECTION_ERROR`` that a retry cannot fix: the SuperLink's
#: certificate is not signed by the given CA or names another host, or the SuperLink does not
#: speak TLS. (Other SSL errors, e.g. an EOF while the SuperLink restarts, are transient.)
_TLS_PERMANENT = ("certificate_verify_failed", "certificate verify failed", "hostname mismatch",
                  "wrong_version_number", "wrong version number")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class SupernodeExit:
    """Why Flower's SuperNode exited, from its log.

    Attributes:
        code: Flower's exit code (``Exit Code: N`` in the log), or None when it logged none (it
            was stopped, or lost its connection after being admitted).
        permanent: restarting with the same command and files cannot succeed.
        refused: the SuperLink refused to activate this SuperNode (Fleet API error
            ``FLEET_NODE_ACTIVATION_FAILED``): its public key is not registered there, or a
            SuperNode with this key that was killed is still marked online (until Flower's
            heartbeat expiry, 60 s). Not permanent by itself: the caller decides how long to retry.
        reason: Flower's own lines about it, without colour codes ('' when none).
    """

    code: int | None
    permanent: bool
    refused: bool
    reason: str


def classify_supernode_exit(log_text: str) -> SupernodeExit:
    """Read why a SuperNode exited from the text of its log since it was started.

    Flower logs ``Exit Code: N``, its message and a help line, then ``For more information``.
    """
    text = _ANSI.sub("", log_text)
    found = list(re.finditer(r"Exit Code: (\d+)\n(.*?)(?:\n\s*\nFor more information|\Z)", text, re.S))
    if not found:
        return SupernodeExit(None, False, False, "")
    code, reason = int(found[-1].group(1)), found[-1].group(2).strip()
    low = reason.lower()
    refused = (code == ExitCode.SUPERNODE_CONNECTION_ERROR
               and f"[code: {int(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)}]" in reason)
    permanent = code in PERMANENT_EXIT_CODES or (
        code == ExitCode.SUPERNODE_CONNECTION_ERROR and any(t in low for t in _TLS_PERMANENT))
    return SupernodeExit(code, permanent, refused, reason)
