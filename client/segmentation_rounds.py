"""One federation round at a segmentation site: the shared encoder through a local decoder.

The site trains the global encoder together with its own U-Net decoder (kept in its
state directory, never sent) on the per-image Dice + cross-entropy loss, under the
same DP-SGD, ledger and budget rules as a classification site
(:func:`client.rounds.private_round`), and returns only the encoder. Its evaluation
reports the Dice of its decoder on the global encoder for its validation images.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from client.fewshot import mean_ci95
from client.rounds import RoundSettings, TrainOutcome, private_round
from client.segmentation import dice_per_image, train_segmenter
from client.site import SiteRuntime, site_seed
from client.train import DPSettings
from medmeta_common.checkpoint import atomic_torch_save, torch_load
from medmeta_common.config import ImageConfig
from medmeta_common.data.segmentation import SegmentationData, load_segmentation
from medmeta_common.data.splits import train_val_split
from medmeta_common.device import pick_device
from medmeta_common.models.decoder import Segmenter, UNetDecoder, build_decoder
from medmeta_common.models.encoder import Encoder
from medmeta_common.protocol import NUM_EXAMPLES

log = logging.getLogger(__name__)

DECODER_FILE = "decoder.pt"
# Adam on the decoder and encoder; the classification recipe's SGD lr does not carry over.
SEGMENTATION_LR = 1e-3

_SPLITS: dict[tuple, tuple[SegmentationData, SegmentationData]] = {}


def segmentation_splits(site: SiteRuntime, image: ImageConfig,
                        seed: int) -> tuple[SegmentationData, SegmentationData]:
    """Training and validation slices/tiles, split by source volume or image."""
    key = (site.name, site.data.path, image, site.tile, site.val_fraction, seed)
    if key not in _SPLITS:
        data = load_segmentation(site.data.path, image, tile=site.tile)
        groups = data.groups
        if len(set(groups)) < 2:
            log.warning("site %s: one source image only; its validation tiles are split by "
                        "tile, not by source", site.name)
            groups = np.array(data.refs, dtype=object)
        train, val = train_val_split(data, groups, site.val_fraction, seed)
        log.info("site %s: %d training and %d validation slices/tiles", site.name,
                 len(train.masks), len(val.masks))
        _SPLITS[key] = (train, val)
    return _SPLITS[key]


def load_decoder(site: SiteRuntime, encoder: Encoder, classes: int, seed: int) -> UNetDecoder:
    """The site's saved decoder, or a fresh one (data-independent) on first use."""
    decoder = build_decoder(encoder, classes, seed)
    path = site.state_dir / DECODER_FILE
    if path.exists():
        saved = torch_load(path)
        own = decoder.state_dict()
        if saved.keys() == own.keys() and all(saved[k].shape == own[k].shape for k in own):
            decoder.load_state_dict(saved)
        else:
            log.warning("site %s: the saved decoder does not fit this model; starting a new one",
                        site.name)
    return decoder


def train_segmentation_round(site: SiteRuntime, settings: RoundSettings,
                             encoder: Encoder) -> TrainOutcome:
    """One round of (DP-)training of the global encoder through the site's decoder."""
    started = time.monotonic()
    torch.set_num_threads(site.threads)
    train, _ = segmentation_splits(site, settings.image, settings.seed)
    model = Segmenter(encoder, load_decoder(site, encoder, len(train.classes), settings.seed))
    device = pick_device(site.device)  # type: ignore[arg-type]
    seed = site_seed(site.name, settings.seed * 100_003 + settings.server_round)
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(train.masks)}
    steps, batch = settings.train.local_steps, settings.train.batch_size

    if not site.privacy.enabled:
        log.warning("site %s: training WITHOUT differential privacy (privacy.enabled: false)",
                    site.name)
        loss = train_segmenter(model, train, steps=steps, batch_size=batch,
                               lr=SEGMENTATION_LR, seed=seed, device=device)
        metrics.update({"dp": 0, "round-steps": steps, "train-loss": loss})
    else:
        if site.privacy.unit != "image":
            raise ValueError(f"site {site.name}: privacy.unit '{site.privacy.unit}' is not "
                             "supported for segmentation yet; use 'image' (one slice or tile)")
        rate = min(1.0, batch / len(train.masks))

        def run(dp: DPSettings) -> int:
            train_segmenter(model, train, steps=steps, batch_size=batch, lr=SEGMENTATION_LR,
                            seed=seed, device=device, dp=dp)
            return steps

        if not private_round(site, settings, units=len(train.masks), rate=rate, train=run,
                             metrics=metrics):
            return TrainOutcome(None, metrics)
    site.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(site.state_dir / DECODER_FILE, model.decoder.state_dict())
    metrics["refused"] = 0
    metrics["compute-seconds"] = round(time.monotonic() - started, 3)
    return TrainOutcome(model.encoder, metrics)


def evaluate_segmentation_round(site: SiteRuntime, settings: RoundSettings,
                                encoder: Encoder) -> dict[str, float | int]:
    """Dice of the site's decoder on the global encoder, over its validation slices/tiles."""
    torch.set_num_threads(site.threads)
    _, val = segmentation_splits(site, settings.image, settings.seed)
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(val.masks)}
    if len(val.masks) == 0:
        return metrics
    model = Segmenter(encoder, load_decoder(site, encoder, len(val.classes), settings.seed))
    model.eval()
    with torch.no_grad():
        scores = dice_per_image(model(torch.from_numpy(val.images)), torch.from_numpy(val.masks))
    mean, ci = mean_ci95(scores)
    metrics.update({"dice": mean, "dice-ci95": ci})
    return metrics
