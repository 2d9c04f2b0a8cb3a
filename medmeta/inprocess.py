"""Flower's Grid, served in this process by the real ClientApp of every simulated site.

A simulated federation needs no transport: :class:`InProcessGrid` implements Flower's
:class:`~flwr.serverapp.Grid` for the real ServerApp code (:func:`server.app.run_federation`
and its :class:`~server.strategy.MetaStrategy`), and answers every message by calling
the real ClientApp (:mod:`client.app`, its handlers and mods) of the node it is
addressed to, with a persistent Flower :class:`~flwr.app.Context` per node — what
Flower's simulation engine does, minus Ray (no start-up per federation, one process,
sites one at a time). Messages are deep-copied on the way in and out, so the server
and the sites share nothing but what the messages carry, and every reply is kept in
:attr:`InProcessGrid.replies` for tests that inspect what left a site.

A ClientApp that raises is answered with an error reply, as Flower's engine does; a
node in :attr:`InProcessGrid.offline` does not answer at all (a dead site).
"""

from __future__ import annotations

import copy
import logging
import random
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

# A Flower ClientApp mod: (message, context, call_next) -> reply.
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


class InProcessGrid(Grid):
    """A Grid whose nodes are the ClientApp called in this process.

    Parameters
    ----------
    client_app : ClientApp
        The site code every node runs.
    node_configs : sequence of mapping
        One node config per simulated node (e.g. ``partition-id``).
    mods : mapping, optional
        Extra ClientApp mods of chosen nodes, by position in ``node_configs`` (to
        simulate hostile or broken sites); they wrap the whole ClientApp.
    seed : int
        Seed of the node ids (Flower's are random 64-bit integers).

    """

    def __init__(self, client_app: ClientApp, node_configs: Sequence[Mapping[str, Any]], *,
                 mods: Mapping[int, Sequence[Mod]] | None = None, seed: int = 0) -> None:
        ids = random.Random(seed).sample(range(1, 2**62), len(node_configs))
        self._app = client_app
        self._run = Run.create_empty(run_id=1)
        self._contexts = {node: Context(run_id=1, node_id=node, node_config=dict(config),
                                        state=RecordDict(), run_config={})
                          for node, config in zip(ids, node_configs, strict=True)}
        self._mods = {ids[i]: list(m) for i, m in (mods or {}).items()}
        self._pending: dict[str, Message] = {}
        self.node_ids: list[int] = ids
        self.offline: set[int] = set()
        self.replies: list[Message] = []
        # Flower stamps new messages with the identity of the process's task; its own
        # ServerApp runner sets it for the server, and so does this one.
        TaskIdentity.task_id, TaskIdentity.run_id = 1, self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # --- Grid -----------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        """Keep the run this grid serves."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """A new message to ``dst_node_id`` (Flower's deprecated helper)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every simulated node (an offline one is still registered)."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the replies for pulling."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            message.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            if node not in self._contexts:
                raise ValueError(f"no node {node} in this simulated federation")
            if node in self.offline:
                continue
            reply = self._deliver(node, copy.deepcopy(message))
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._pending[message.metadata.message_id] = copy.deepcopy(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that have arrived (each once)."""
        found = [self._pending.pop(m) for m in message_ids if m in self._pending]
        self.replies.extend(found)
        return found

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push and pull at once: every live node has answered when the push returns."""
        return self.pull_messages(self.push_messages(messages))

    # --- the nodes -------------------------------------------------------------------

    def _deliver(self, node: int, message: Message) -> Message:
        def app(msg: Message, context: Context) -> Message:
            return self._app(msg, context)

        call: Callable[[Message, Context], Message] = app

        for mod in reversed(self._mods.get(node, [])):
            call = _wrapped(mod, call)
        try:
            return call(message, self._contexts[node])
        except Exception as exc:  # noqa: BLE001 - a site's failure becomes its error reply
            log.debug("node %d failed:\n%s", node, traceback.format_exc())
            reason = f"{type(exc).__name__}: {exc}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                           reply_to=message)


def _wrapped(mod: Mod, call_next: Callable[[Message, Context], Message]
             ) -> Callable[[Message, Context], Message]:
    def call(message: Message, context: Context) -> Message:
        return mod(message, context, call_next)
    return call
