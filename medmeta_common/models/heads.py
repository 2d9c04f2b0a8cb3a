"""Site-local task heads. They stay at the site: only the encoder is ever sent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Scaled cosine similarity between embeddings and per-class weight vectors.

    The "Baseline++" head (Chen et al. 2019, "A Closer Look at Few-shot
    Classification"): ``logits = scale * cos(z, w_c)``. Each record's logits depend on
    that record and the parameters only, so a loss summed over records is a valid
    DP-SGD objective. Normalised weights also keep heads of different sites on the
    same scale, which helps the shared encoder stay aligned across sites.

    Parameters
    ----------
    embedding_dim : int
        Length of the encoder's embedding.
    n_classes : int
        Classes of the site's label schema.
    scale : float
        Inverse temperature of the softmax.

    """

    def __init__(self, embedding_dim: int, n_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(n_classes, embedding_dim) * 0.1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.scale * F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T

    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Initialise the class weights from class-mean embeddings (adaptation only)."""
        self.weight.copy_(prototypes)


class EncoderWithHead(nn.Module):
    """The encoder and its site-local heads as one module (what DP-SGD trains at a site).

    ``rotation`` is the optional self-supervised head that predicts which of four
    rotations an image was given (Gidaris et al. 2018): a per-record objective that
    keeps features generic.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module,
                 rotation: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.rotation = rotation

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Class logits, or ``(class logits, rotation logits)`` with a rotation head."""
        embeddings = self.encoder(images)
        if self.rotation is None:
            return self.head(embeddings)
        return self.head(embeddings), self.rotation(embeddings)


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean of the L2-normalised embeddings of each class, ``(n_classes, D)``."""
    normed = F.normalize(embeddings, dim=-1)
    sums = torch.zeros(n_classes, normed.shape[-1], dtype=normed.dtype, device=normed.device)
    sums.index_add_(0, labels, normed)
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).unsqueeze(1)
    return sums / counts
