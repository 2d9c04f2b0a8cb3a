"""Small real federations on the built-in demo data (no files), shared by several tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, MessageType

CONFIG = """
name: retries
seed: 0
rounds: 2
image: {{size: 16, channels: 1}}
train: {{local_steps: 3, batch_size: 16}}
privacy: {{epsilon: 4.0}}
server: {{min_sites: 2, max_failed_rounds: 2{server}}}
evaluation: {{ways: 2, shots: 2, queries: 2, episodes: 2}}
sites:
  - name: site-a
    data: {{path: "{data_a}"}}
  - name: site-b
    data: {{path: "{data_b}"}}
"""


def federation(tmp: Path, *, server: str = "", data_a: str = "builtin:demo/site-0",
               data_b: str = "builtin:demo/site-1") -> Path:
    path = tmp / "federation.yaml"
    path.write_text(CONFIG.format(server=server, data_a=data_a, data_b=data_b))
    return path


def fails_first_training() -> Callable[[Message, Context, Callable[[Message, Context], Message]],
                                       Message]:
    """A ClientApp mod: the site's first train message fails (a crash), later ones work."""
    calls = {"train": 0}

    def mod(msg: Message, context: Context,
            call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            calls["train"] += 1
            if calls["train"] == 1:
                raise RuntimeError("the site's GPU fell over")
        return call_next(msg, context)

    return mod
