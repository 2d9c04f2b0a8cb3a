"""Detection at a new site: adapt a head on the meta-learned encoder, predict boxes.

``medmeta adapt --task detection --shots K`` runs episodes: K annotated source images
(all their tiles) are the support set, every other image of the site is a query; a
fresh head (data-independent initialisation) is trained on the support set only and
the queries are scored with mAP@0.5 and mAP@[.5:.95] (MONAI's COCO metric). With the
default ``--finetune head`` the encoder stays frozen and its features are computed
once per image and flip (the head is the only thing that learns), which makes an
episode a few seconds on a CPU. ``--finetune film|all`` trains a copy of the encoder
too. Nothing is tuned on query labels: steps, learning rate, top-k and the tiling are
fixed in advance.

With ``--save``, a head trained on all the annotated images is saved with the
encoder; ``medmeta predict`` then writes ``boxes.csv``, ``boxes.json`` (COCO-style
results with ``images`` and ``categories``) and one overlay PNG per input.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from client.fewshot import mean_ci95
from client.meta_model import (
    MetaModel,
    load_meta_model,
    model_settings,
    read_model_file,
    saved_encoder,
)
from client.tasks.base import AdaptDefaults, AdaptRequest
from client.tasks.detection_training import (
    MAP,
    MAP50,
    batch_boxes,
    batch_loss,
    detect,
    fit_detector,
    mean_average_precision,
)
from medmeta_common.checkpoint import atomic_torch_save, atomic_write, atomic_write_text
from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.data.detection import DetectionData, image_rows, to_source_coords
from medmeta_common.data.images import input_files, read_image_file
from medmeta_common.data.sources import load_detection
from medmeta_common.errors import ConfigError, DataError
from medmeta_common.models.detection import Detections, Detector, build_head
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.privacy.dp_sgd import BatchLoss, train_steps
from medmeta_common.privacy.sampling import Draw, FixedBatchSampler

log = logging.getLogger(__name__)

DETECTOR_FILE = "adapted_detector.pt"
HEAD_LR = 1e-3
HEAD_BATCH = 32
# Flips of the cached features: none, horizontal, vertical, both (the training augmentation).
FLIPS = ((), (-1,), (-2,), (-1, -2))
# Boxes drawn on the overlays (all detections go to boxes.csv / boxes.json with their scores).
OVERLAY_MIN_SCORE = 0.3
# Boxes of neighbouring tiles that overlap this much are one object.
MERGE_IOU = 0.5
ENCODER_PART: dict[str, Literal["none", "film", "all"]] = {
    "head": "none", "film": "film", "all": "all"}


@dataclass(frozen=True)
class MapResult:
    """Few-shot detection quality over episodes."""

    map50_mean: float
    map50_ci95: float
    map_mean: float
    map_ci95: float
    shots: int
    episodes: int
    # Each episode's mAP@0.5 (same seeds, same episodes: for paired comparisons).
    map50_per_episode: tuple[float, ...] = ()


class FeatureCache:
    """The frozen encoder's head-input maps of every row, for each flip (computed once)."""

    def __init__(self, detector: Detector, images: np.ndarray, device: torch.device) -> None:
        self.variants: list[list[torch.Tensor]] = []
        detector.encoder.to(device).eval()
        with torch.no_grad():
            for dims in FLIPS:
                parts: list[list[torch.Tensor]] = []
                for start in range(0, len(images), 64):
                    batch = torch.from_numpy(images[start:start + 64]).to(device)
                    parts.append(detector.selected_features(batch.flip(dims) if dims else batch))
                self.variants.append([torch.cat(maps) for maps in zip(*parts, strict=True)])

    def features(self, rows: torch.Tensor, flips: torch.Tensor) -> list[torch.Tensor]:
        """The maps of ``rows``, each in its flip ``flips[i]`` (an index into FLIPS)."""
        chosen = [torch.stack([self.variants[int(f)][level][int(r)]
                               for r, f in zip(rows, flips, strict=True)])
                  for level in range(len(self.variants[0]))]
        return chosen


def _flip_boxes(boxes: torch.Tensor, rows: torch.Tensor, flips: torch.Tensor,
                size: int) -> torch.Tensor:
    flipped = boxes.clone()
    for bit, (low, high) in ((1, (0, 2)), (2, (1, 3))):
        mask = ((flips[rows] & bit) > 0)[:, None]
        mirrored = flipped.clone()
        mirrored[:, low], mirrored[:, high] = size - flipped[:, high], size - flipped[:, low]
        flipped = torch.where(mask, mirrored, flipped)
    return flipped


def fit_head_on_cache(detector: Detector, cache: FeatureCache, data: DetectionData,
                      rows: np.ndarray, *, steps: int, seed: int) -> float:
    """Train the head alone on cached features of ``rows`` (random flips); the mean loss."""
    generator = torch.Generator().manual_seed(seed)
    size, classes = data.images.shape[-1], len(data.classes)
    head = detector.head.train()

    def loss(trained: torch.nn.Module, draw: Draw) -> BatchLoss:
        index = rows[draw.index]
        boxes, labels, batch_rows = batch_boxes(data, index)
        # FLIPS index: bit 1 horizontal, bit 2 vertical.
        flips = torch.randint(0, 4, (len(index),), generator=generator)
        boxes = _flip_boxes(boxes, batch_rows, flips, size)
        output = trained(cache.features(torch.from_numpy(index), flips))
        total = batch_loss(output, boxes, labels, batch_rows, classes=classes, input_size=size)
        return BatchLoss(total, len(index))

    optimizer = torch.optim.Adam(head.parameters(), lr=HEAD_LR)
    sampler = FixedBatchSampler(len(rows), HEAD_BATCH, np.random.default_rng(seed))
    stats = train_steps(head, optimizer, sampler, loss, steps=steps, dp=None,
                        device=torch.device("cpu"), reduction="sum")
    head.eval()
    return stats.mean_loss


def _episode_split(data: DetectionData, shots: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    sources = np.unique(data.sources)
    order = rng.permutation(len(sources))
    support = np.isin(data.sources, sources[order[:shots]])
    return np.flatnonzero(support), np.flatnonzero(~support)


def evaluate_fewshot_detection(encoder: SharedEncoder, data: DetectionData, *, shots: int,
                               episodes: int = 10, steps: int = 300, finetune: str = "head",
                               seed: int = 0, device: torch.device | None = None) -> MapResult:
    """MAP on the other images after training a fresh head on ``shots`` annotated images."""
    device = device or torch.device("cpu")
    images = len(np.unique(data.sources))
    if shots < 1 or shots + 1 > images:
        raise ValueError(f"{shots} support images need at least {shots + 1} annotated images, "
                         f"the site has {images}")
    rng = np.random.default_rng(seed)
    classes = len(data.classes)
    cache = FeatureCache(Detector(encoder, build_head(encoder, classes, seed)), data.images,
                         device) if finetune == "head" else None
    map50s, maps = [], []
    for episode in range(episodes):
        support, query = _episode_split(data, shots, rng)
        if cache is not None:
            detector = Detector(encoder, build_head(encoder, classes, seed + episode))
            fit_head_on_cache(detector, cache, data, support, steps=steps, seed=seed + episode)
            maps_of = cache.variants[0]
            found = []
            with torch.no_grad():
                for start in range(0, len(query), 256):
                    part = torch.from_numpy(query[start:start + 256])
                    output = detector.head([m[part] for m in maps_of])
                    found.extend(_decode(output, classes, data.images.shape[-1]))
        else:
            detector = Detector(copy.deepcopy(encoder),
                                build_head(encoder, classes, seed + episode))
            fit_detector(detector, data.subset(support), steps=steps,
                         batch_size=min(HEAD_BATCH, len(support)), lr=HEAD_LR,
                         seed=seed + episode, device=device, encoder_part=ENCODER_PART[finetune])
            detector.eval()
            found = detect(detector, data.images[query], classes, device)
        scores = mean_average_precision(found, data.subset(query))
        map50s.append(scores[MAP50])
        maps.append(scores[MAP])
    map50, map50_ci = mean_ci95(map50s)
    mean_map, map_ci = mean_ci95(maps)
    return MapResult(map50, map50_ci, mean_map, map_ci, shots, len(map50s), tuple(map50s))


def _decode(output: torch.Tensor, classes: int, size: int) -> list[Detections]:
    from medmeta_common.models.detection import decode

    return decode(output, classes, size / output.shape[-1])


@dataclass
class AdaptedDetector:
    """A site's detector: encoder, head, classes and the settings to apply them."""

    model: Detector
    classes: tuple[str, ...]
    image: ImageConfig
    model_config: ModelConfig
    tile: int
    info: dict[str, Any]


def adapt_detection(meta: MetaModel, data: DetectionData, *, steps: int, finetune: str,
                    tile: int, seed: int = 0) -> AdaptedDetector:
    """Train a head (and with ``finetune`` film/all the encoder) on all annotated images."""
    detector = Detector(meta.encoder, build_head(meta.encoder, len(data.classes), seed))
    if finetune == "head":
        cache = FeatureCache(detector, data.images, torch.device("cpu"))
        fit_head_on_cache(detector, cache, data, np.arange(len(data)), steps=steps, seed=seed)
    else:
        fit_detector(detector, data, steps=steps, batch_size=min(HEAD_BATCH, len(data)),
                     lr=HEAD_LR, seed=seed, device=torch.device("cpu"),
                     encoder_part=ENCODER_PART[finetune])
    info = {"federation": meta.federation, "meta_round": meta.round,
            "images": len(np.unique(data.sources)), "rows": len(data), "steps": steps,
            "finetune": finetune}
    return AdaptedDetector(detector.eval(), data.classes, meta.image, meta.model, tile, info)


def save_detector(adapted: AdaptedDetector, folder: Path) -> Path:
    """Write the adapted detector into ``folder`` (atomically)."""
    path = Path(folder) / DETECTOR_FILE
    atomic_torch_save(path, {
        "kind": "medmeta-adapted-detector", "format": 1,
        "encoder": adapted.model.encoder.state_dict(), "head": adapted.model.head.state_dict(),
        "classes": list(adapted.classes), "tile": adapted.tile,
        "image": asdict(adapted.image), "model": asdict(adapted.model_config),
        "info": adapted.info})
    return path


def is_detector(folder: Path) -> bool:
    """True if ``folder`` holds a model written by :func:`save_detector`."""
    return (Path(folder) / DETECTOR_FILE).exists() or Path(folder).name == DETECTOR_FILE


def load_detector(folder: Path) -> AdaptedDetector:
    """Load a model written by :func:`save_detector`."""
    path = Path(folder) / DETECTOR_FILE if Path(folder).is_dir() else Path(folder)
    payload = read_model_file(path, "medmeta-adapted-detector", "a medmeta adapted detector")
    image, model_config = model_settings(payload, str(path))
    encoder = saved_encoder(payload["encoder"], image, model_config, str(path))
    classes = tuple(str(c) for c in payload["classes"])
    head = build_head(encoder, len(classes), 0)
    head.load_state_dict(payload["head"])
    return AdaptedDetector(Detector(encoder, head).eval(), classes, image, model_config,
                           int(payload["tile"]), dict(payload.get("info", {})))


def detect_in_image(adapted: AdaptedDetector, pixels: np.ndarray) -> Detections:
    """Boxes in a ``(C, H, W)`` image's own pixels: tile, detect, map back, merge tiles."""
    from monai.data.box_utils import non_max_suppression

    rows, origins = image_rows(pixels, adapted.image, tile=adapted.tile)
    found = detect(adapted.model, rows, len(adapted.classes), torch.device("cpu"))
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


def adapt_command(request: AdaptRequest, defaults: AdaptDefaults) -> tuple[dict[str, Any], str]:
    """``medmeta adapt --task detection``: the ``--json`` report and a summary line."""
    if request.shots < 1:
        raise ConfigError(source="--shots", field="shots", expected="at least 1",
                          found=str(request.shots))
    meta = load_meta_model(request.checkpoint)
    data = load_detection(request.data, meta.image, tile=request.tile)
    steps = defaults.steps_for(request.shots, request.finetune_steps)
    finetune = request.finetune or defaults.finetune
    result = evaluate_fewshot_detection(meta.encoder, data, shots=request.shots,
                                        episodes=request.episodes or defaults.episodes,
                                        steps=steps, finetune=finetune, seed=request.seed)
    if request.save is not None:
        adapted = adapt_detection(meta, data, steps=steps, finetune=finetune, tile=request.tile,
                                  seed=request.seed)
        log.info("adapted detector written to %s", save_detector(adapted, request.save))
    report = {"map50_mean": result.map50_mean, "map50_ci95": result.map50_ci95,
              "shots": result.shots, "episodes": result.episodes,
              "map_mean": result.map_mean, "map_ci95": result.map_ci95}
    summary = (f"{result.shots}-shot mAP@0.5: {result.map50_mean:.3f} ± {result.map50_ci95:.3f}"
               f" (mAP@[.5:.95] {result.map_mean:.3f}; 95% interval over {result.episodes} "
               f"episodes; meta-model of round {meta.round})")
    return report, summary


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
