"""What the operator's and the hospital's commands print alike (keys written, insecure runs)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("medmeta")


def print_written(written: Any, keep: str, send: str) -> None:
    """List the key files a ``certs`` command wrote: which to keep secret, which to send."""
    for path in written.secret:
        print(f"  keep secret : {path}  ({keep})")
    for path in written.public:
        print(f"  hand out    : {path}  ({send})")


def warn_insecure(kind: str) -> None:
    """Say, at every start, that a process runs without TLS and node authentication."""
    log.warning("%s runs INSECURE: no TLS and no node authentication (insecure: true). Use "
                "this only for tests on one machine.", kind)
