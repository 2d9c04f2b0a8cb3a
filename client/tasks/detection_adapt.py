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
encoder; ``medmeta predict`` (:mod:`client.tasks.detection_predict`) then writes
``boxes.csv``, ``boxes.json`` (COCO-style results with ``images`` and ``categories``)
and one overlay PNG per input.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
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
    mirror_boxes,
    on_images,
)
from medmeta_common.checkpoint import atomic_torch_save
from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.data.detection import DetectionData
from medmeta_common.data.sources import load_detection
from medmeta_common.errors import ConfigError
from medmeta_common.models.detection import Detector, build_head
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.privacy.dp_sgd import BatchLoss, train_steps
from medmeta_common.privacy.sampling import Draw, FixedBatchSampler

log = logging.getLogger(__name__)

DETECTOR_FILE = "adapted_detector.pt"
HEAD_LR = 1e-3
HEAD_BATCH = 32
# Flips of the cached features: none, horizontal, vertical, both (the training augmentation).
FLIPS = ((), (-1,), (-2,), (-1, -2))
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
        detector.encoder.to(device).eval()
        variants = []  # per flip: the head's input maps of every row
        with torch.no_grad():
            for dims in FLIPS:
                parts = [detector.selected_features(batch.flip(dims) if dims else batch)
                         for batch in torch.from_numpy(images).to(device).split(64)]
                variants.append([torch.cat(maps) for maps in zip(*parts, strict=True)])
        # One tensor per map, indexed (flip, row).
        self.levels = [torch.stack(maps) for maps in zip(*variants, strict=True)]

    def features(self, rows: torch.Tensor, flips: torch.Tensor) -> list[torch.Tensor]:
        """The maps of ``rows``, each in its flip ``flips[i]`` (an index into FLIPS)."""
        return [level[flips, rows] for level in self.levels]

    def head_on(self, head: torch.nn.Module) -> Callable[[np.ndarray], torch.Tensor]:
        """``head`` as a forward pass over batches of row indices (unflipped)."""
        def forward(rows: np.ndarray) -> torch.Tensor:
            index = torch.from_numpy(rows)
            return head(self.features(index, torch.zeros_like(index)))
        return forward


def _flip_boxes(boxes: torch.Tensor, rows: torch.Tensor, flips: torch.Tensor,
                size: int) -> torch.Tensor:
    """Boxes of each batch row mirrored as its flip says (bit 1 horizontal, bit 2 vertical)."""
    for bit, horizontal in ((1, True), (2, False)):
        boxes = mirror_boxes(boxes, (flips[rows] & bit) > 0, horizontal=horizontal, size=size)
    return boxes


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
            found = detect(cache.head_on(detector.head), query, classes=classes,
                           input_size=data.images.shape[-1])
        else:
            detector = Detector(copy.deepcopy(encoder),
                                build_head(encoder, classes, seed + episode))
            fit_detector(detector, data.subset(support), steps=steps,
                         batch_size=min(HEAD_BATCH, len(support)), lr=HEAD_LR,
                         seed=seed + episode, device=device, encoder_part=ENCODER_PART[finetune])
            detector.eval()
            found = detect(on_images(detector, device), data.images[query], classes=classes,
                           input_size=data.images.shape[-1])
        scores = mean_average_precision(found, data.subset(query))
        map50s.append(scores[MAP50])
        maps.append(scores[MAP])
    map50, map50_ci = mean_ci95(map50s)
    mean_map, map_ci = mean_ci95(maps)
    return MapResult(map50, map50_ci, mean_map, map_ci, shots, len(map50s), tuple(map50s))


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
