"""Training pieces of a detection site: the per-image loss with flips, mAP, and fine-tuning.

Shared by the detection plugin (:mod:`client.tasks.detection`, federated rounds through
the one DP-SGD loop) and its adaptation at a new site (:mod:`client.tasks.detection_adapt`).
The loss's DP argument is in :mod:`medmeta_common.models.detection`. mAP comes from
MONAI's COCO metric (``monai.apps.detection.metrics``), not our own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from client.tasks.finetuning import EncoderPart, finetune
from medmeta_common.data.detection import DetectionData
from medmeta_common.models.detection import (
    Detections,
    Detector,
    decode,
    make_targets,
    per_image_loss,
)
from medmeta_common.privacy.dp_sgd import BatchLoss, TaskLoss
from medmeta_common.privacy.sampling import Draw

MAP50 = "map50"
MAP = "map"  # mAP@[.5:.95]
EVAL_BATCH = 64
MAX_DET = 100


def batch_boxes(data: DetectionData, index: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes, labels and batch rows of the data rows at ``index`` (in that order)."""
    position = np.full(len(data), -1, dtype=np.int64)
    position[index] = np.arange(len(index))
    keep = position[data.box_rows] >= 0
    return (torch.from_numpy(data.boxes[keep]).float(),
            torch.from_numpy(data.box_labels[keep]).long(),
            torch.from_numpy(position[data.box_rows[keep]]))


def mirror_boxes(boxes: torch.Tensor, flip: torch.Tensor, *, horizontal: bool,
                 size: int) -> torch.Tensor:
    """``boxes`` mirrored in a ``size`` square where ``flip`` (one flag per box) is set."""
    low, high = (0, 2) if horizontal else (1, 3)
    mirrored = boxes.clone()
    mirrored[:, low], mirrored[:, high] = size - boxes[:, high], size - boxes[:, low]
    return torch.where(flip[:, None], mirrored, boxes)


def flip_boxes(images: torch.Tensor, boxes: torch.Tensor, rows: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal and vertical flips drawn per image, its boxes flipped with it."""
    size = images.shape[-1]
    for dim in (-1, -2):
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(dim), images)
        boxes = mirror_boxes(boxes, flip[rows], horizontal=dim == -1, size=size)
    return images, boxes


def batch_loss(output: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
               rows: torch.Tensor, *, classes: int, input_size: int) -> torch.Tensor:
    """The summed per-image loss of a forward pass ``output`` against its boxes."""
    grid = (output.shape[-2], output.shape[-1])
    device = output.device
    targets = make_targets(boxes.to(device), labels.to(device), rows.to(device),
                           batch=len(output), classes=classes, grid=grid,
                           stride=input_size / grid[1])
    return per_image_loss(output, targets).sum()


def detection_loss(data: DetectionData, generator: torch.Generator,
                   device: torch.device) -> TaskLoss:
    """The batch loss: flipped rows, summed per-image detection loss."""
    images = torch.from_numpy(data.images)
    classes, size = len(data.classes), data.images.shape[-1]

    def loss(trained: torch.nn.Module, draw: Draw) -> BatchLoss:
        boxes, labels, rows = batch_boxes(data, draw.index)
        batch, boxes = flip_boxes(images[draw.index], boxes, rows, generator)
        total = batch_loss(trained(batch.to(device)), boxes, labels, rows,
                           classes=classes, input_size=size)
        return BatchLoss(total, len(draw.index))

    return loss


def detect(forward: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray, *,
           classes: int, input_size: int) -> list[Detections]:
    """Detections of every row, ``forward`` applied to batches of ``rows``, no gradients.

    ``rows`` are images (see :func:`on_images`) or whatever ``forward`` reads them from
    (the adaptation's cached features take row indices).
    """
    results: list[Detections] = []
    with torch.no_grad():
        for start in range(0, len(rows), EVAL_BATCH):
            output = forward(rows[start:start + EVAL_BATCH])
            results.extend(decode(output, classes, input_size / output.shape[-1]))
    return results


def on_images(model: torch.nn.Module, device: torch.device
              ) -> Callable[[np.ndarray], torch.Tensor]:
    """``model`` as a forward pass over a batch of images ``(B, C, S, S)`` (float32)."""
    return lambda batch: model(torch.from_numpy(batch).to(device))


def mean_average_precision(detections: Sequence[Detections], data: DetectionData
                           ) -> dict[str, float]:
    """mAP@0.5 and mAP@[.5:.95] (MONAI's COCO metric, 100 detections per image)."""
    metric = COCOMetric(classes=list(data.classes), iou_list=(0.5,),
                        iou_range=(0.5, 0.95, 0.05), max_detection=(MAX_DET,),
                        per_class=False, verbose=False)
    truth = [data.boxes_of(row) for row in range(len(data))]
    matches = matching_batch(box_iou, list(metric.iou_thresholds),  # type: ignore[arg-type]
                             [d.boxes for d in detections], [d.labels for d in detections],
                             [d.scores for d in detections], [b for b, _ in truth],
                             [labels for _, labels in truth], max_detections=MAX_DET)
    scores = metric(matches)[0]
    return {MAP50: max(0.0, float(scores[f"AP_IoU_0.50_MaxDet_{MAX_DET}"])),
            MAP: max(0.0, float(scores[f"mAP_IoU_0.50_0.95_0.05_MaxDet_{MAX_DET}"]))}


def fit_detector(model: Detector, data: DetectionData, *, steps: int, batch_size: int,
                 lr: float, seed: int, device: torch.device,
                 encoder_part: EncoderPart = "none") -> float:
    """Non-private fine-tuning at a new site (the head, and ``encoder_part``); the mean loss."""
    return finetune(model, model.encoder, lambda g: detection_loss(data, g, device),
                    rows=len(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    device=device, encoder_part=encoder_part)
