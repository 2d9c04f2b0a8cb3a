"""Which settings each task honours; a site that sets one its task cannot honour is refused.

A task is what a site trains the shared encoder for (``task:`` of a site). Every data
field means the same for every task, but not every task can use every field: a
segmentation site's masks are binary, so it cannot select ``classes``. Rather than
ignore such a field, the configuration refuses it, naming the field, as any other
bad setting. The site-side implementation of each task lives in ``client/tasks/``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from medmeta_common.config.data import DataConfig
from medmeta_common.config.typed import check

TaskName = Literal["classification", "segmentation", "detection"]
TASKS: tuple[str, ...] = get_args(TaskName)

# A site's ``tile`` when it does not set one (segmentation: the tile side, in pixels).
DEFAULT_TILE = 128


@dataclass(frozen=True)
class TaskFields:
    """What a task makes of a site's settings.

    Attributes
    ----------
    refused : dict
        Data fields the task cannot honour, each with the reason given when set.
    tiles : bool
        Whether the site's ``tile`` setting is used.
    frames : {"middle", "all"}
        What ``data.frames: null`` (the default) means: the middle frame of a
        multi-frame image or volume, or every frame/slice.

    """

    refused: dict[str, str]
    tiles: bool
    frames: Literal["middle", "all"]


TASK_FIELDS: dict[str, TaskFields] = {
    "classification": TaskFields(refused={}, tiles=False, frames="middle"),
    "segmentation": TaskFields(
        refused={
            "classes": "segmentation masks are binary (background / foreground); select "
                       "images with split or partition instead",
            "group_key": "it names an array of a plain .npz file, and segmentation data are "
                         "image/mask files; give patient ids in the folder's manifest",
        },
        tiles=True, frames="all"),
    "detection": TaskFields(
        refused={
            "group_key": "it names an array of a plain .npz file, and detection data are "
                         "image files with box annotations; give patient ids in a boxes.csv "
                         "patient_id column",
            "frames": "detection reads 2-D images (one frame each)",
        },
        tiles=True, frames="middle"),
}


def check_task_fields(task: str, data: DataConfig, tile: int) -> None:
    """Refuse (ConfigError) the data fields and ``tile`` that ``task`` cannot honour."""
    honoured = TASK_FIELDS[task]
    defaults = DataConfig(path=data.path)
    for item in fields(DataConfig):
        reason = honoured.refused.get(item.name)
        value: Any = getattr(data, item.name)
        if reason is not None:
            check(value == getattr(defaults, item.name), field=f"data.{item.name}",
                  expected=f"unset at a {task} site ({reason})", found=value)
    check(honoured.tiles or tile == DEFAULT_TILE, field="tile",
          expected=f"unset at a {task} site (tiling applies to segmentation sites)", found=tile)


def frames_for(task: str, data: DataConfig) -> Literal["middle", "all"]:
    """The frame policy of ``data`` at a ``task`` site (``null`` is the task's default)."""
    return data.frames or TASK_FIELDS[task].frames
