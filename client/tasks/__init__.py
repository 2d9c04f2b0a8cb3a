"""The task plugins a site can train for, by name (a site's ``task:`` setting).

Each task lives in its own module (:mod:`client.tasks.base` says what it supplies)
and is imported on first use, so a site pays only for the task it runs. The
registry refuses to register a name twice rather than silently replace a task.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from client.tasks.base import Task

_FACTORIES: dict[str, Callable[[], Task[Any]]] = {}
_LOADED: dict[str, Task[Any]] = {}


def register(name: str, factory: Callable[[], Task[Any]]) -> None:
    """Make ``factory`` the task called ``name``; a name is registered only once."""
    if name in _FACTORIES:
        raise ValueError(f"task {name!r} is already registered")
    _FACTORIES[name] = factory


def _lazy(module: str, cls: str) -> Callable[[], Task[Any]]:
    def factory() -> Task[Any]:
        task: Task[Any] = getattr(importlib.import_module(module), cls)()
        return task
    return factory


register("classification", _lazy("client.tasks.classification", "ClassificationTask"))
register("segmentation", _lazy("client.tasks.segmentation", "SegmentationTask"))
register("detection", _lazy("client.tasks.detection", "DetectionTask"))


def get_task(name: str) -> Task[Any]:
    """The task called ``name`` (one instance per process)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_FACTORIES))}")
    if name not in _LOADED:
        _LOADED[name] = _FACTORIES[name]()
    return _LOADED[name]


def task_names() -> tuple[str, ...]:
    """The registered task names."""
    return tuple(sorted(_FACTORIES))
