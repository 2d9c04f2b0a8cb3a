"""Who the sites are: names for node ids, and what became of each site's last update.

Flower addresses nodes by random 64-bit ids; the operator's logs, metrics, status and
dashboard name sites instead. A deployed site is known by the name the operator
registered its key under (``sites.json``, written by ``medmeta server start``): that
name is authenticated and wins. Otherwise (simulation, insecure test set-ups) a site
is asked its name once (a ``query`` message); the answer is operator metadata, not
data. Each site is also told, in its next message, what the server did with its
previous update, so the hospital's own log says whether its round counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medmeta_common.protocol import CONFIG_KEY
from server.round_outcome import site_reason

log = logging.getLogger(__name__)


class SiteDirectory:
    """Site names by node id, and each site's last verdict."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.registered: dict[int, str] = {}
        self.verdicts: dict[int, tuple[int, str]] = {}
        self._told: set[int] = set()  # nodes already told their latest verdict

    def name(self, node_id: int) -> str:
        """The registered name of a node, else the name it gave, else ``node-<id>``."""
        return self.registered.get(node_id) or self.names.get(node_id, f"node-{node_id}")

    def register(self, names: Mapping[int, str]) -> None:
        """Names the operator registered for authenticated nodes."""
        self.registered.update(names)

    def learn(self, grid: Grid, *, timeout: float) -> None:
        """Ask newly connected, unregistered nodes for their site names."""
        unknown = [n for n in grid.get_node_ids()
                   if n not in self.names and n not in self.registered]
        if not unknown:
            return
        questions = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                     for n in unknown]
        for reply in grid.send_and_receive(questions, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not say its site name: %s", node, reply.error.reason)
                continue
            record = reply.content.config_records.get("site")
            name = record.get("name") if record else None
            if isinstance(name, str) and name:
                self.names[node] = name

    def remember(self, record: Mapping[str, Any], asked: Iterable[int], min_sites: int) -> None:
        """Keep what became of each asked site's update in the round ``record``."""
        by_name = {self.name(n): n for n in asked}
        failed = record.get("accepted", 0) < min_sites
        for name, metrics in record.get("sites", {}).items():
            node = by_name.get(name)
            if node is None:
                continue
            why = site_reason(metrics)
            verdict = "accepted" if why is None else why
            if why is None and failed:
                verdict = "accepted, but the round had too few sites and is tried again"
            self.verdicts[node] = (int(record["round"]), verdict[:200])
            self._told.discard(node)

    def feedback(self, node_id: int, *, again: bool = False) -> dict[str, int | str]:
        """Config entries telling a site what became of its previous update.

        Each verdict is told once (the next message to the site), unless ``again``.
        """
        if node_id not in self.verdicts or (node_id in self._told and not again):
            return {}
        round_number, verdict = self.verdicts[node_id]
        return {"previous-round": round_number, "previous-verdict": verdict}

    def told(self, node_id: int) -> dict[str, int | str]:
        """:meth:`feedback` for one message that will carry it (the verdict is then told)."""
        extra = self.feedback(node_id)
        if extra:
            self._told.add(node_id)
        return extra

    def with_feedback(self, messages: Iterable[Message]) -> list[Message]:
        """Each message with its site's feedback added to a copy of the round's config."""
        result = []
        for message in messages:
            node = message.metadata.dst_node_id
            extra = self.feedback(node)
            if not extra or CONFIG_KEY not in message.content.config_records:
                result.append(message)
                continue
            self._told.add(node)
            content = RecordDict(dict(message.content.array_records))
            config = message.content.config_records[CONFIG_KEY]
            content[CONFIG_KEY] = ConfigRecord({**dict(config), **extra})
            result.append(Message(content, dst_node_id=node,
                                  message_type=message.metadata.message_type))
        return result
