"""Pull a task's input from the SuperNode, retrying a not-yet-arrived object promptly.

The SuperNode offers a task as soon as its message is announced, while the message's
objects (the encoder's arrays) may still be on their way from the SuperLink. Flower's
``pull_task_input`` (``flwr/supernode/runtime/run_clientapp.py``, 1.42) then retries
each missing object after 1, 2, 4, 8 s: a runner that asks early — one the launcher
started ahead of its task always does — waits up to 15 s for arrays that arrive
within a second. This is the same sequence of Flower Runtime API calls with a short
retry (0.1 s doubling to at most 0.5 s; Flower's overall time and retry limits).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity

FIRST_RETRY_S = 0.1
LONGEST_RETRY_S = 0.5


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and app bundle (Flower's calls, prompt retries)."""
    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task.task_id
    TaskIdentity.run_id = task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    run = run_from_proto(task.run)
    fab = fab_from_proto(task.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=FIRST_RETRY_S, backoff_cap=LONGEST_RETRY_S)
    # The inflated message does not hold its own id (its object id): set it, as Flower does.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab
