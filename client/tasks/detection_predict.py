"""``medmeta predict`` with an adapted detector: boxes, COCO-style JSON and overlays.

Each input image is tiled exactly as the site's data were (``image_rows``), detected
tile by tile, its boxes mapped back to the image's own pixels and the duplicates of
overlapping tiles merged (class-wise NMS). ``boxes.csv`` and ``boxes.json`` hold every
detection with its score (a file that cannot be read is listed with the reason);
``overlays/<name>_boxes.png`` draws those scoring :data:`OVERLAY_MIN_SCORE` or more
for a person to check. All are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.tasks.detection_adapt import AdaptedDetector, load_detector
from client.tasks.detection_training import detect, on_images
from medmeta_common.checkpoint import atomic_write, atomic_write_text
from medmeta_common.data.detection import image_rows, to_source_coords
from medmeta_common.data.images import input_files, read_image_file
from medmeta_common.errors import ConfigError, DataError
from medmeta_common.models.detection import Detections

log = logging.getLogger(__name__)

# Boxes drawn on the overlays (all detections go to boxes.csv / boxes.json with their scores).
OVERLAY_MIN_SCORE = 0.3
# Boxes of neighbouring tiles that overlap this much are one object.
MERGE_IOU = 0.5


def detect_in_image(adapted: AdaptedDetector, pixels: np.ndarray) -> Detections:
    """Boxes in a ``(C, H, W)`` image's own pixels: tile, detect, map back, merge tiles."""
    from monai.data.box_utils import non_max_suppression

    rows, origins = image_rows(pixels, adapted.image, tile=adapted.tile)
    found = detect(on_images(adapted.model, torch.device("cpu")), rows,
                   classes=len(adapted.classes), input_size=adapted.image.size)
    boxes = [to_source_coords(origins[i], d.boxes) for i, d in enumerate(found)]
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    labels = np.concatenate([d.labels for d in found])
    scores = np.concatenate([d.scores for d in found])
    if len(found) > 1 and len(all_boxes):  # tiles overlap: one box per object, per class
        keep_all = []
        for label in np.unique(labels):
            index = np.flatnonzero(labels == label)
            kept = non_max_suppression(torch.from_numpy(all_boxes[index]),
                                       torch.from_numpy(scores[index]), MERGE_IOU)
            keep_all.append(index[np.asarray(kept)])
        keep = np.concatenate(keep_all)
        keep = keep[np.argsort(-scores[keep])]
        all_boxes, labels, scores = all_boxes[keep], labels[keep], scores[keep]
    h, w = pixels.shape[-2:]
    all_boxes = np.clip(all_boxes, 0, [w, h, w, h])
    return Detections(all_boxes, labels, scores)


@dataclass(frozen=True)
class BoxesResult:
    """One input's detections, or why it could not be read."""

    file: str
    detections: Detections | None = None
    size: tuple[int, int] = (0, 0)
    overlay: str = ""
    error: str = ""


def predict_boxes(adapted: AdaptedDetector, files: list[Path], out: Path, *,
                  root: Path) -> list[BoxesResult]:
    """Detect in every input; write overlays, ``boxes.csv`` and ``boxes.json`` under ``out``."""
    results = []
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        try:
            pixels = read_image_file(path, frames="middle").frames[0]
        except DataError as error:
            results.append(BoxesResult(name, error=error.reason))
            continue
        found = detect_in_image(adapted, pixels)
        target = out / "overlays" / f"{Path(name).with_suffix('')}_boxes.png"
        _write_overlay(target, pixels, found, adapted.classes)
        results.append(BoxesResult(name, found, (pixels.shape[-1], pixels.shape[-2]),
                                   str(target.relative_to(out))))
    atomic_write_text(out / "boxes.csv", _csv(results, adapted.classes))
    atomic_write_text(out / "boxes.json", json.dumps(_coco(results, adapted.classes), indent=1))
    return results


def _csv(results: list[BoxesResult], classes: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "x_min", "y_min", "x_max", "y_max", "label", "score", "error"])
    for r in results:
        if r.detections is None:
            writer.writerow([r.file, "", "", "", "", "", "", r.error])
            continue
        for box, label, score in zip(r.detections.boxes, r.detections.labels,
                                     r.detections.scores, strict=True):
            writer.writerow([r.file, *(f"{v:.1f}" for v in box), classes[int(label)],
                             f"{score:.4f}", ""])
    return buffer.getvalue()


def _coco(results: list[BoxesResult], classes: tuple[str, ...]) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, r in enumerate(results, start=1):
        if r.detections is None:
            continue
        images.append({"id": image_id, "file_name": r.file, "width": r.size[0],
                       "height": r.size[1]})
        for box, label, score in zip(r.detections.boxes, r.detections.labels,
                                     r.detections.scores, strict=True):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(label) + 1,
                                "bbox": [round(x0, 1), round(y0, 1), round(x1 - x0, 1),
                                         round(y1 - y0, 1)], "score": round(float(score), 4)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
            "errors": [{"file": r.file, "reason": r.error} for r in results if r.error]}


_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60))


def _write_overlay(target: Path, pixels: np.ndarray, found: Detections,
                   classes: tuple[str, ...]) -> None:
    from PIL import Image, ImageDraw

    low, high = float(pixels.min()), float(pixels.max())
    grey = ((pixels - low) / (high - low or 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey, 3, axis=0) if grey.shape[0] == 1 else grey[:3]
    image = Image.fromarray(np.moveaxis(rgb, 0, -1).copy())
    draw = ImageDraw.Draw(image)
    for box, label, score in zip(found.boxes, found.labels, found.scores, strict=True):
        if score < OVERLAY_MIN_SCORE:
            continue
        colour = _COLOURS[int(label) % len(_COLOURS)]
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{classes[int(label)]} {score:.2f}",
                  fill=colour)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda handle: image.save(handle, format="PNG"))


def predict_command(folder: Path, inputs: Path, out: Path | None) -> int:
    """``medmeta predict`` with a saved detector: boxes and overlays in ``out``."""
    if out is None:
        raise ConfigError(source="--out", field="out", expected="a folder for the boxes "
                          "(a detection model writes boxes.csv, boxes.json and overlays)",
                          found="nothing")
    root = inputs if inputs.is_dir() else inputs.parent
    results = predict_boxes(load_detector(folder), input_files(inputs), out, root=root)
    failed = sum(bool(r.error) for r in results)
    log.info("%d image(s) with boxes written to %s, %d file(s) could not be read; "
             "summary: %s", len(results) - failed, out, failed, out / "boxes.csv")
    return failed
