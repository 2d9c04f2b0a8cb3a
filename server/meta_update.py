"""The server's meta-update: move the global encoder toward the sites' adapted encoders.

Reptile (Nichol et al. 2018) / first-order FedMeta (Chen et al. 2018): with
``delta = mean_i(theta_i) - theta``, ``theta <- theta + meta_lr * delta``. Seen as a
step on the pseudo-gradient ``g = -delta`` it is SGD with learning rate ``meta_lr``,
so momentum and Adam come for free from torch's optimisers (as in FedOpt, Reddi et
al. 2021). With ``sgd`` and ``meta_lr = 1`` it reduces to FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from medmeta_common.config import MetaUpdateConfig


class MetaOptimizer:
    """Applies meta-update steps and carries the optimiser state across rounds.

    ``config`` holds the whole ``server`` section, so that the strategy finds the
    aggregation settings (``aggregator``, ``max_update_norm``...) next to the step's.
    """

    def __init__(self, meta: MetaUpdateConfig, initial: Mapping[str, np.ndarray]) -> None:
        self.config = meta
        self.keys = list(initial)
        self.params = [torch.nn.Parameter(torch.tensor(np.asarray(initial[k]), dtype=torch.float32))
                       for k in self.keys]
        if meta.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.params, lr=meta.meta_lr, betas=(meta.momentum, meta.beta2))
        else:
            momentum = meta.momentum if meta.optimizer == "momentum" else 0.0
            self.optimizer = torch.optim.SGD(self.params, lr=meta.meta_lr, momentum=momentum)

    def step(self, current: Mapping[str, np.ndarray],
             target: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One meta-update from ``current`` toward ``target`` (the sites' mean)."""
        with torch.no_grad():
            for key, param in zip(self.keys, self.params, strict=True):
                param.copy_(torch.from_numpy(np.asarray(current[key], dtype=np.float32)))
                param.grad = param.detach() - torch.from_numpy(
                    np.asarray(target[key], dtype=np.float32))
        self.optimizer.step()
        return {k: p.detach().numpy().copy() for k, p in zip(self.keys, self.params, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state for the checkpoint."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore optimiser state from a checkpoint (empty state: nothing to restore)."""
        if state:
            self.optimizer.load_state_dict(state)
