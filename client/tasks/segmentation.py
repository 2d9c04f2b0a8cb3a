"""Segmentation: a site-local U-Net decoder on the shared encoder's stages, Dice.

A segmentation site trains the global encoder together with its own decoder (kept in
its state directory, never sent) and returns only the encoder; its validation metric
is the Dice of its decoder on the global encoder.

Per-record loss (the DP argument of this task)
-----------------------------------------------
The loss of a batch is the *sum of per-row terms*, each the pixel-mean cross-entropy
plus the soft Dice loss (MONAI ``DiceLoss``, foreground only, computed per image:
``batch=False``) of one slice or tile against its own mask. Encoder and decoder use
GroupNorm only, so no term depends on another row. The privacy record is a whole
source image — a volume with all its slices, a large image with all its tiles —
because they are one image of one patient: records are Poisson-sampled whole and
their rows' gradients summed into one before clipping (``privacy.unit: patient``
groups them further by the manifest's patients). ``tests/test_segmentation.py`` checks
the per-sample gradients against a one-image oracle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.fewshot import mean_ci95
from client.settings import RoundSettings, SiteRuntime
from client.tasks.base import (
    AdaptDefaults,
    AdaptRequest,
    Metrics,
)
from client.tasks.dense import DenseTask, load_site_part
from client.tasks.segmentation_training import (
    dice_per_image,
    segmentation_loss,
)
from medmeta_common.checkpoint import atomic_torch_save
from medmeta_common.config import DataConfig, ImageConfig, TrainConfig
from medmeta_common.data.segmentation import SegmentationData
from medmeta_common.data.sources import load_segmentation
from medmeta_common.models.decoder import Segmenter, UNetDecoder, build_decoder
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.privacy.dp_sgd import TaskLoss
from medmeta_common.protocol import NUM_EXAMPLES

log = logging.getLogger(__name__)

DECODER_FILE = "decoder.pt"

class SegmentationTask(DenseTask[SegmentationData]):
    """Images with binary masks; see the module docstring."""

    name = "segmentation"
    record = "one source image (a volume with all its slices, an image with all its tiles)"
    rows = "slices/tiles"
    adapt_defaults = AdaptDefaults(episodes=20, finetune_steps=100)

    def read(self, data: DataConfig, image: ImageConfig, *, tile: int) -> SegmentationData:
        """The site's image/mask pairs, sliced, tiled and harmonised."""
        return load_segmentation(data, image, tile=tile)

    def from_arrays(self, arrays: dict[str, np.ndarray]) -> SegmentationData:
        """The site's cached slices and tiles."""
        return SegmentationData.from_arrays(arrays)

    def validation_groups(self, site_name: str, data: SegmentationData) -> np.ndarray:
        """Patients (or source images); a single source is split by tile, with a warning."""
        if len(set(data.groups)) < 2:
            log.warning("site %s: one source image only; its validation tiles are split by "
                        "tile, not by source", site_name)
            return np.array(data.refs, dtype=object)
        return data.groups

    def site_model(self, site: SiteRuntime, encoder: SharedEncoder, data: SegmentationData,
                   settings: RoundSettings) -> Segmenter:
        """The encoder with the site's decoder."""
        return Segmenter(encoder, load_decoder(site, encoder, len(data.classes), settings.seed))

    def save_site_model(self, site: SiteRuntime, model: torch.nn.Module,
                        data: SegmentationData) -> None:
        """Keep the decoder in the state directory."""
        assert isinstance(model, Segmenter)
        site.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(site.state_dir / DECODER_FILE, model.decoder.state_dict())

    def loss(self, model: torch.nn.Module, data: SegmentationData, train: TrainConfig, *,
             generator: torch.Generator, device: torch.device, amp: bool) -> TaskLoss:
        """The per-row Dice + cross-entropy loss of the module docstring."""
        return segmentation_loss(data, generator, device)

    def evaluate(self, site: SiteRuntime, settings: RoundSettings, encoder: SharedEncoder,
                 val: SegmentationData, device: torch.device) -> Metrics:
        """Dice of the site's decoder on the global encoder, over its validation rows."""
        metrics: Metrics = {NUM_EXAMPLES: len(val)}
        if len(val) == 0:
            return metrics
        model = Segmenter(encoder, load_decoder(site, encoder, len(val.classes), settings.seed))
        model.eval()
        with torch.no_grad():
            scores = dice_per_image(model(torch.from_numpy(val.images)),
                                    torch.from_numpy(val.masks))
        mean, ci = mean_ci95(scores)
        metrics.update({"dice": mean, "dice-ci95": ci})
        return metrics

    def adapt(self, request: AdaptRequest) -> tuple[dict[str, Any], str]:
        """Few-shot Dice over episodes; with ``save``, a segmenter from all images."""
        from client.tasks.segmentation_adapt import adapt_command

        return adapt_command(request, self.adapt_defaults)

    def owns_model(self, folder: Path) -> bool:
        """A folder written by ``adapt --save`` for segmentation."""
        from client.tasks.segmentation_adapt import is_segmenter

        return is_segmenter(folder)

    def predict(self, folder: Path, inputs: Path, out: Path | None) -> int:
        """One mask file per input and ``masks.csv`` in ``out``."""
        from client.tasks.segmentation_adapt import predict_command

        return predict_command(folder, inputs, out)


def load_decoder(site: SiteRuntime, encoder: SharedEncoder, classes: int, seed: int) -> UNetDecoder:
    """The site's saved decoder, or a fresh one (data-independent) on first use."""
    return load_site_part(site, DECODER_FILE, build_decoder(encoder, classes, seed), "decoder")
