"""``evaluation`` / ``fewshot``: N-way K-shot episodes for few-shot evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from medmeta_common.config.typed import check


@dataclass(frozen=True)
class FewShotConfig:
    """An N-way K-shot evaluation: episodes with disjoint support and query sets.

    ``finetune_steps`` Adam steps on the support set follow the prototypes (0: prototypes
    only), at ``finetune_lr`` (``null``: the fine-tuning mode's own rate,
    :data:`client.fewshot.FINETUNE_LR`).
    """

    ways: int = 3
    shots: int = 5
    queries: int = 10
    episodes: int = 200
    finetune_steps: int = 0
    finetune_lr: float | None = None

    def __post_init__(self) -> None:
        check(self.ways >= 2, field="ways", expected="at least 2", found=self.ways)
        check(self.shots >= 1, field="shots", expected="at least 1", found=self.shots)
        check(self.queries >= 1, field="queries", expected="at least 1", found=self.queries)
        check(self.episodes >= 1, field="episodes", expected="at least 1", found=self.episodes)
        check(self.finetune_steps >= 0, field="finetune_steps", expected="0 or more",
              found=self.finetune_steps)
        check(self.finetune_lr is None or self.finetune_lr > 0, field="finetune_lr",
              expected="a positive number or null", found=self.finetune_lr)
