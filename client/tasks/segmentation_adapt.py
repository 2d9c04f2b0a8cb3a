"""Segmentation at a new site: adapt a decoder on the meta-learned encoder, predict masks.

``medmeta adapt --task segmentation`` scores episodes with
:func:`client.tasks.segmentation.evaluate_fewshot_segmentation` and, with ``--save``,
trains a decoder (and optionally the encoder) on all the site's annotated images.
``medmeta predict`` with such a model writes one mask per input next to a CSV summary:
PNG (0/255) for 2-D images, NIfTI (``.nii.gz``, the source's affine when it is NIfTI)
for volumes. Large 2-D images are predicted tile by tile, as they were trained; every
prediction is mapped back to the input's own size and geometry.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from client.fewshot import mean_ci95
from client.meta_model import (
    MetaModel,
    load_meta_model,
    model_settings,
    read_model_file,
    saved_encoder,
)
from client.tasks.base import AdaptDefaults, AdaptRequest
from client.tasks.segmentation_training import dice_per_image, fit_segmenter
from medmeta_common.checkpoint import atomic_torch_save, atomic_write, atomic_write_text
from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.data.images import input_files, read_image_file, suffix_of
from medmeta_common.data.segmentation import CLASSES, SegmentationData
from medmeta_common.data.sources import load_segmentation
from medmeta_common.data.transforms import harmonise_stack
from medmeta_common.errors import ConfigError, DataError
from medmeta_common.models.decoder import Segmenter, build_decoder, decoder_for
from medmeta_common.models.encoder import SharedEncoder

log = logging.getLogger(__name__)

# What of the encoder a segmentation fine-tuning mode trains beside the decoder.
ENCODER_PART: dict[str, Literal["none", "film", "all"]] = {
    "decoder": "none", "film": "film", "all": "all"}

SEGMENTER_FILE = "adapted_segmenter.pt"


@dataclass(frozen=True)
class DiceResult:
    """Few-shot segmentation quality over episodes."""

    dice_mean: float
    dice_ci95: float
    shots: int
    episodes: int
    # The same over query images that have foreground only (an empty image segmented as
    # empty scores 1 above, which flatters sets with many background-only slices).
    foreground_dice_mean: float = math.nan
    foreground_dice_ci95: float = math.nan


def evaluate_fewshot_segmentation(encoder: SharedEncoder, data: SegmentationData, *, shots: int,
                                  queries: int = 10, episodes: int = 20, steps: int = 100,
                                  lr: float = 1e-3, finetune: str = "decoder", seed: int = 0,
                                  device: torch.device | None = None) -> DiceResult:
    """Mean Dice on query images after adapting a fresh decoder on ``shots`` support images.

    Each episode draws disjoint support and query images (seeded), trains a new decoder
    (and, with ``finetune="all"``, a copy of the encoder) on the support images only,
    and scores the queries. The interval is 1.96 standard errors over episodes.
    """
    device = device or torch.device("cpu")
    if shots + 1 > len(data):
        raise ValueError(f"{shots} support images need at least {shots + 1} images, "
                         f"the site has {len(data)}")
    rng = np.random.default_rng(seed)
    scores, foreground_scores = [], []
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}
    for episode in range(episodes):
        order = rng.permutation(len(data))
        support = data.subset(order[:shots])
        query = data.subset(order[shots:shots + queries])
        encoder.load_state_dict(initial)
        model = Segmenter(encoder, build_decoder(encoder, len(data.classes), seed + episode))
        fit_segmenter(model, support, steps=steps, batch_size=shots, lr=lr,
                      seed=seed + episode, device=device, encoder_part=ENCODER_PART[finetune])
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(query.images).to(device))
        dice = dice_per_image(logits, torch.from_numpy(query.masks).to(device))
        scores.append(float(dice.mean()))
        has_foreground = query.masks.reshape(len(query.masks), -1).any(axis=1)
        if has_foreground.any():
            foreground_scores.append(float(dice[has_foreground].mean()))
    encoder.load_state_dict(initial)
    mean, ci = mean_ci95(scores)
    foreground_mean, foreground_ci = mean_ci95(foreground_scores)
    return DiceResult(mean, ci, shots, len(scores), foreground_mean, foreground_ci)


@dataclass
class AdaptedSegmenter:
    """A site's segmentation model: encoder, decoder and the settings to apply them."""

    model: Segmenter
    image: ImageConfig
    model_config: ModelConfig
    tile: int
    info: dict[str, Any]


def adapt_segmentation(meta: MetaModel, data: SegmentationData, *, steps: int = 200,
                       finetune: str = "decoder", tile: int = 128, seed: int = 0
                       ) -> AdaptedSegmenter:
    """Train a decoder (and with ``finetune='all'`` the encoder) on all annotated images."""
    model = Segmenter(meta.encoder, build_decoder(meta.encoder, len(CLASSES), seed))
    fit_segmenter(model, data, steps=steps, batch_size=min(16, len(data)), lr=1e-3,
                  seed=seed, device=torch.device("cpu"), encoder_part=ENCODER_PART[finetune])
    info = {"federation": meta.federation, "meta_round": meta.round, "images": len(data),
            "steps": steps, "finetune": finetune, "classes": list(CLASSES)}
    return AdaptedSegmenter(model.eval(), meta.image, meta.model, tile, info)


def save_segmenter(adapted: AdaptedSegmenter, folder: Path) -> Path:
    """Write the adapted segmenter into ``folder`` (atomically)."""
    path = Path(folder) / SEGMENTER_FILE
    atomic_torch_save(path, {
        "kind": "medmeta-adapted-segmenter", "format": 1,
        "encoder": adapted.model.encoder.state_dict(),
        "decoder": adapted.model.decoder.state_dict(), "tile": adapted.tile,
        "image": asdict(adapted.image), "model": asdict(adapted.model_config),
        "info": adapted.info})
    return path


def is_segmenter(folder: Path) -> bool:
    """True if ``folder`` holds a model written by :func:`save_segmenter`."""
    return (Path(folder) / SEGMENTER_FILE).exists() or Path(folder).name == SEGMENTER_FILE


def load_segmenter(folder: Path) -> AdaptedSegmenter:
    """Load a model written by :func:`save_segmenter`."""
    path = Path(folder) / SEGMENTER_FILE if Path(folder).is_dir() else Path(folder)
    payload = read_model_file(path, "medmeta-adapted-segmenter", "a medmeta adapted segmenter")
    image, model_config = model_settings(payload, str(path))
    encoder = saved_encoder(payload["encoder"], image, model_config, str(path))
    decoder = decoder_for(encoder, len(CLASSES))
    decoder.load_state_dict(payload["decoder"])
    return AdaptedSegmenter(Segmenter(encoder, decoder).eval(), image, model_config,
                            int(payload["tile"]), dict(payload.get("info", {})))


def predict_frame(adapted: AdaptedSegmenter, pixels: np.ndarray) -> np.ndarray:
    """A 0/1 mask ``(H, W)`` for one ``(C, H, W)`` frame, at the frame's own size."""
    h, w = pixels.shape[-2:]
    tile = adapted.tile
    if max(h, w) > 1.5 * tile:  # as in training: tile by tile, the edges padded
        rows, cols = -(-h // tile), -(-w // tile)
        padded = np.pad(pixels, ((0, 0), (0, rows * tile - h), (0, cols * tile - w)),
                        mode="reflect")
        mask = np.zeros((rows * tile, cols * tile), dtype=np.uint8)
        for r in range(rows):
            for c in range(cols):
                part = padded[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                mask[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = \
                    predict_frame(adapted, part)
        return mask[:h, :w]
    size = adapted.image.size
    image = harmonise_stack(pixels[None], size=size, channels=adapted.image.channels,
                            intensity=adapted.image.intensity)
    with torch.no_grad():
        probs = adapted.model(torch.from_numpy(image)).softmax(dim=1)[:, 1:2]
    # Undo the square padding, then resample to the frame's size.
    scale = size / max(h, w)
    inner_h, inner_w = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - inner_h) // 2, (size - inner_w) // 2
    probs = probs[:, :, top:top + inner_h, left:left + inner_w]
    probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
    return (probs[0, 0] > 0.5).numpy().astype(np.uint8)


@dataclass(frozen=True)
class MaskResult:
    """One input's mask file, or why it could not be read."""

    file: str
    mask: str = ""
    frames: int = 0
    foreground_fraction: float = float("nan")
    error: str = ""


def predict_masks(adapted: AdaptedSegmenter, files: list[Path], out: Path, *,
                  root: Path) -> list[MaskResult]:
    """Write a mask per input under ``out`` (mirroring ``root``) and ``masks.csv``."""
    results = []
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        try:
            frames = read_image_file(path, frames="all").frames
        except DataError as error:
            results.append(MaskResult(name, error=error.reason))
            continue
        masks = np.stack([predict_frame(adapted, f) for f in frames])
        volume = suffix_of(path) in (".nii", ".nii.gz", ".nrrd", ".nhdr") or len(frames) > 1
        stem = name[: -len(suffix_of(path))] if suffix_of(path) else name
        target = out / (f"{stem}_mask.nii.gz" if volume else f"{stem}_mask.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_mask(target, masks, path if suffix_of(path).startswith(".nii") else None)
        results.append(MaskResult(name, str(target.relative_to(out)), len(frames),
                                  float(masks.mean())))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "mask", "frames", "foreground_fraction", "error"])
    for r in results:
        writer.writerow([r.file, r.mask, r.frames, f"{r.foreground_fraction:.6f}", r.error])
    atomic_write_text(out / "masks.csv", buffer.getvalue())
    return results


def _write_mask(target: Path, masks: np.ndarray, nifti_source: Path | None) -> None:
    if target.name.endswith(".png"):
        from PIL import Image

        image = Image.fromarray((masks[0] * 255).astype(np.uint8))
        atomic_write(target, lambda handle: image.save(handle, format="PNG"))
        return
    import nibabel as nib

    # A NIfTI image has an affine (nibabel types nib.load as any image file).
    source = nib.load(str(nifti_source)) if nifti_source is not None else None
    affine = source.affine if source is not None else np.eye(4)  # type: ignore[attr-defined]
    # Frames were read as (Z, H, W) from an (X, Y, Z) volume: write back in that order.
    volume = nib.Nifti1Image(np.moveaxis(masks, 0, -1).astype(np.uint8), affine)
    payload = gzip.compress(volume.to_bytes())
    atomic_write(target, lambda handle: handle.write(payload))


def adapt_command(request: AdaptRequest, defaults: AdaptDefaults
                  ) -> tuple[dict[str, Any], str]:
    """``medmeta adapt --task segmentation``: the ``--json`` report and a summary line."""
    if request.shots < 1:
        raise ConfigError(source="--shots", field="shots", expected="at least 1",
                          found=str(request.shots))
    meta = load_meta_model(request.checkpoint)
    data = load_segmentation(request.data, meta.image, tile=request.tile)
    steps = defaults.steps_for(request.shots, request.finetune_steps)
    mode = request.finetune or defaults.finetune
    finetune = "decoder" if mode == "head" else mode
    result = evaluate_fewshot_segmentation(
        meta.encoder, data, shots=request.shots, queries=request.queries,
        episodes=request.episodes or defaults.episodes, steps=steps, finetune=finetune,
        seed=request.seed)
    if request.save is not None:
        adapted = adapt_segmentation(meta, data, steps=steps, finetune=finetune,
                                     tile=request.tile, seed=request.seed)
        log.info("adapted segmenter written to %s", save_segmenter(adapted, request.save))
    report = {"dice_mean": result.dice_mean, "dice_ci95": result.dice_ci95,
              "shots": result.shots, "episodes": result.episodes}
    summary = (f"{result.shots}-shot Dice: {result.dice_mean:.3f} ± {result.dice_ci95:.3f} "
               f"(95% interval over {result.episodes} episodes; meta-model of round "
               f"{meta.round})")
    return report, summary


def predict_command(folder: Path, inputs: Path, out: Path | None) -> int:
    """``medmeta predict`` with a saved segmenter: masks and ``masks.csv`` in ``out``."""
    if out is None:
        raise ConfigError(source="--out", field="out", expected="a folder for the masks "
                          "(a segmentation model writes mask files and masks.csv)",
                          found="nothing")
    root = inputs if inputs.is_dir() else inputs.parent
    results = predict_masks(load_segmenter(folder), input_files(inputs), out, root=root)
    failed = sum(bool(r.error) for r in results)
    log.info("%d mask(s) written to %s, %d file(s) could not be read; summary: %s",
             len(results) - failed, out, failed, out / "masks.csv")
    return failed
