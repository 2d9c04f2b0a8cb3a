"""Pick the training device and its mixed-precision context."""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch

log = logging.getLogger(__name__)


def pick_device(choice: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """CUDA when asked for or available (``auto``), else CPU; a missing GPU is an error."""
    if choice == "cuda":
        if not torch.cuda.is_available():
            from medmeta_common.errors import ConfigError

            raise ConfigError(source="runtime.device", field="device",
                              expected="a machine with a CUDA GPU",
                              found="no CUDA device (use 'auto' or 'cpu')")
        return torch.device("cuda")
    if choice == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when enabled (no loss scaling needed); nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
