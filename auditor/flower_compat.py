"""Every Flower internal the auditor's side uses (flwr 1.41), in one place.

Flower's public API covers writing a ClientApp; the auditor also needs:

* its vetted executor (:mod:`auditor.executor`): take ClientApp tasks from the SuperNode's local
  Runtime API (SuperNode ``--isolation process``), pull the message, push the reply and the
  task's status, as Flower's own ``flwr-clientapp`` process does;
* the bundle hash Flower computes for ``flwr run`` (:func:`build_fab_from_disk`);
* a shorter idle poll in the SuperNode loop (:func:`patch_supernode_loop`, :mod:`auditor.supernode`).

When Flower changes these internals, this module is what to adapt.
"""

from __future__ import annotations

import functools

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
           "acquire_clientapp_task", "build_fab_from_disk", "error_reply",
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
