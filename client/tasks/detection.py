"""Detection: a site-local anchor-free head on the shared encoder's stages, mAP@0.5.

A detection site trains the global encoder together with its own detection head
(:mod:`medmeta_common.models.detection`, kept in its state directory, never sent) and
returns only the encoder; its validation metric is the mAP@0.5 (and mAP@[.5:.95]) of
its head on the global encoder, from MONAI's COCO metric.

Per-record loss (the DP argument of this task)
-----------------------------------------------
The batch loss is a sum of per-row terms, each normalised by its own row's objects
(see :func:`medmeta_common.models.detection.per_image_loss`; no batch-level count of
positives). Flips are drawn per row; there is no mosaic or mixup across images. The
privacy record is a whole source image: the tiles of a large image are Poisson-sampled
together and their gradients merged before clipping (``privacy.unit: patient`` groups
them further by patient where the data names patients). Nothing is fitted to the
site's boxes: the head has no anchors, decoding has no tuned threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.settings import RoundSettings, SiteRuntime
from client.tasks.base import AdaptDefaults, AdaptRequest, Metrics
from client.tasks.dense import DenseTask, load_site_part
from client.tasks.detection_training import (
    MAP,
    MAP50,
    detect,
    detection_loss,
    mean_average_precision,
    on_images,
)
from medmeta_common.checkpoint import atomic_torch_save
from medmeta_common.config import DataConfig, ImageConfig, TrainConfig
from medmeta_common.data.detection import DetectionData
from medmeta_common.data.sources import load_detection
from medmeta_common.models.detection import (
    DetectionHead,
    Detector,
    build_head,
    unreached_parameters,
)
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.privacy.dp_sgd import TaskLoss
from medmeta_common.protocol import NUM_EXAMPLES

log = logging.getLogger(__name__)

HEAD_FILE = "detection_head.pt"


class DetectionTask(DenseTask[DetectionData]):
    """Images (or tiles) with labelled boxes; see the module docstring."""

    name = "detection"
    record = "one source image (a large image with all its tiles)"
    rows = "images/tiles"
    # Head-only adaptation on cached frozen features (benchmarks/detection.py).
    adapt_defaults = AdaptDefaults(episodes=10, finetune_steps=300, finetune="head")

    def read(self, data: DataConfig, image: ImageConfig, *, tile: int) -> DetectionData:
        """The site's images and boxes, tiled and harmonised."""
        return load_detection(data, image, tile=tile)

    def from_arrays(self, arrays: dict[str, np.ndarray]) -> DetectionData:
        """The site's cached rows and boxes."""
        return DetectionData.from_arrays(arrays)

    def validation_groups(self, site_name: str, data: DetectionData) -> np.ndarray:
        """Patients, else source images: tiles of one image stay on one side."""
        return data.groups

    def unreachable(self, encoder: SharedEncoder) -> list[str]:
        """The stages deeper than the maps the head reads (found by a blank backward pass)."""
        return unreached_parameters(encoder)

    def site_model(self, site: SiteRuntime, encoder: SharedEncoder, data: DetectionData,
                   settings: RoundSettings) -> Detector:
        """The encoder with the site's detection head."""
        return Detector(encoder, load_head(site, encoder, len(data.classes), settings.seed))

    def save_site_model(self, site: SiteRuntime, model: torch.nn.Module,
                        data: DetectionData) -> None:
        """Keep the head in the state directory."""
        assert isinstance(model, Detector)
        site.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(site.state_dir / HEAD_FILE, model.head.state_dict())

    def loss(self, model: torch.nn.Module, data: DetectionData, train: TrainConfig, *,
             generator: torch.Generator, device: torch.device, amp: bool) -> TaskLoss:
        """The per-image detection loss of the module docstring."""
        return detection_loss(data, generator, device)

    def evaluate(self, site: SiteRuntime, settings: RoundSettings, encoder: SharedEncoder,
                 val: DetectionData, device: torch.device) -> Metrics:
        """The mAP of the site's head on the global encoder, over its validation rows."""
        metrics: Metrics = {NUM_EXAMPLES: len(val)}
        if len(val) == 0:
            return metrics
        model = Detector(encoder, load_head(site, encoder, len(val.classes), settings.seed))
        model.to(device).eval()
        found = detect(on_images(model, device), val.images, classes=len(val.classes),
                       input_size=val.images.shape[-1])
        scores = mean_average_precision(found, val)
        metrics.update({MAP50: scores[MAP50], MAP: scores[MAP]})
        return metrics

    def adapt(self, request: AdaptRequest) -> tuple[dict[str, Any], str]:
        """Few-shot mAP over episodes; with ``save``, a detector from all images."""
        from client.tasks.detection_adapt import adapt_command

        return adapt_command(request, self.adapt_defaults)

    def owns_model(self, folder: Path) -> bool:
        """A folder written by ``adapt --save`` for detection."""
        from client.tasks.detection_adapt import is_detector

        return is_detector(folder)

    def predict(self, folder: Path, inputs: Path, out: Path | None) -> int:
        """Boxes (CSV and COCO-style JSON) and overlay PNGs in ``out``."""
        from client.tasks.detection_predict import predict_command

        return predict_command(folder, inputs, out)


def load_head(site: SiteRuntime, encoder: SharedEncoder, classes: int, seed: int
              ) -> DetectionHead:
    """The site's saved head, or a fresh one (data-independent) on first use."""
    return load_site_part(site, HEAD_FILE, build_head(encoder, classes, seed), "detection head")
