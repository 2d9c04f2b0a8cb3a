"""Segmentation: masks from real volumes, image pairs and tiles; a DP-valid loss; few-shot Dice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from PIL import Image

from client.round import local_training
from client.tasks import get_task
from client.tasks.segmentation_adapt import evaluate_fewshot_segmentation
from client.tasks.segmentation_training import dice_per_image, per_image_loss
from medmeta_common.config import DataConfig, ImageConfig, ModelConfig, TrainConfig
from medmeta_common.data.segmentation import SegmentationData
from medmeta_common.data.sources import load_segmentation as load_site_segmentation
from medmeta_common.errors import DataError
from medmeta_common.models.decoder import Segmenter, build_decoder
from medmeta_common.models.factory import build_encoder
from medmeta_common.privacy import grad_samplers  # noqa: F401 - our per-sample rules
from medmeta_common.privacy.dp_sgd import DPSettings
from tests.conftest import shared_file

IMAGE = ImageConfig(size=32)


def load_segmentation(folder: Path, image: ImageConfig, *, tile: int = 128,
                      **data: object) -> SegmentationData:
    return load_site_segmentation(DataConfig(path=str(folder), split=None, **data),  # type: ignore[arg-type]
                                  image, tile=tile)


def segmenter(seed: int = 0) -> Segmenter:
    encoder = build_encoder(ModelConfig(), IMAGE, seed)
    return Segmenter(encoder, build_decoder(encoder, 2, seed))


def test_nrrd_volumes_are_sliced_with_their_label_volumes() -> None:
    folder = shared_file("segmentation/brain_breast_mr")
    data = load_segmentation(folder, IMAGE)
    assert data.images.shape[1:] == (1, 32, 32) and data.masks.shape[1:] == (32, 32)
    assert set(data.groups) == {"brain1_image.nrrd", "brain2_image.nrrd", "breast1_image.nrrd"}
    with_tumour = np.array([m.any() for m in data.masks])
    # Policy: every slice with foreground, at most as many background slices as those.
    for group in set(data.groups):
        mine = data.groups == group
        assert with_tumour[mine].sum() >= (~with_tumour[mine]).sum() >= 0
        assert with_tumour[mine].any()
    assert np.isfinite(data.images).all() and set(np.unique(data.masks)) <= {0, 1}


def test_large_png_pairs_are_tiled_and_tiff_instance_masks_binarised() -> None:
    em = load_segmentation(shared_file("segmentation/em_membrane"), IMAGE, tile=128)
    assert len(em.masks) == 30 * 16  # 512x512 images, 128-pixel tiles
    assert em.refs[0].endswith("#tile0_0")
    nuclei = load_segmentation(shared_file("segmentation/nuclei"), IMAGE, tile=128)
    assert set(np.unique(nuclei.masks)) == {0, 1}  # 125 labelled nuclei -> foreground
    assert 0.05 < nuclei.foreground_fraction < 0.6


def test_bad_pairs_are_named_and_skipped(tmp_path: Path) -> None:
    (tmp_path / "image").mkdir()
    (tmp_path / "label").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
            tmp_path / "image" / f"{name}.png")
    Image.fromarray((rng.random((40, 40)) > 0.5).astype(np.uint8) * 255).save(
        tmp_path / "label" / "a.png")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "label" / "b.png")
    data = load_segmentation(tmp_path, IMAGE)
    assert data.refs == ("a.png#slice0",)
    assert any("b.png" in issue.file and "does not match" in issue.reason
               for issue in data.issues)
    with pytest.raises(DataError, match="no image/mask pairs"):
        load_segmentation(tmp_path / "image", IMAGE)


def test_loss_is_a_sum_of_per_image_terms_on_opacus_per_sample_gradients() -> None:
    generator = torch.Generator().manual_seed(0)  # synthetic: the property is the loss's
    images = torch.randn(4, 1, 32, 32, generator=generator)
    masks = (torch.randn(4, 32, 32, generator=generator) > 0.8).long()
    net = segmenter()
    gsm = GradSampleModule(net, loss_reduction="sum")
    per_image_loss(gsm(images), masks).sum().backward()
    samples = [p.grad_sample.detach().clone() for p in net.parameters()]
    gsm.to_standard_module()
    for i in (0, 3):
        single = segmenter()
        per_image_loss(single(images[i:i + 1]), masks[i:i + 1]).sum().backward()
        for sample, param in zip(samples, single.parameters(), strict=True):
            torch.testing.assert_close(sample[i], param.grad, rtol=1e-4, atol=1e-5)


def test_dice_is_one_for_a_perfect_prediction_and_empty_pairs() -> None:
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, 2:5, 2:5] = 1
    logits = torch.nn.functional.one_hot(masks, 2).permute(0, 3, 1, 2).float() * 10
    np.testing.assert_allclose(dice_per_image(logits, masks), [1.0, 1.0])
    assert dice_per_image(-logits, masks)[0] == 0.0


def test_dp_training_steps_under_opacus_and_learning_beats_untrained() -> None:
    data = load_segmentation(shared_file("segmentation/em_membrane"), IMAGE)
    model = segmenter()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    task = get_task("segmentation")
    train = TrainConfig(local_steps=3, batch_size=16)
    rate = task.sampling(data, train).rate
    local_training(task, model, data, train, dp=DPSettings(1.0, rate, 1.0), seed=0,
                   device=torch.device("cpu"), amp=False,
                   units=task.privacy_units(data, "image", source="test"))
    moved = any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert moved
    encoder = build_encoder(ModelConfig(), IMAGE, 0)
    trained = evaluate_fewshot_segmentation(encoder, data, shots=5, episodes=3, steps=60)
    untrained = evaluate_fewshot_segmentation(encoder, data, shots=5, episodes=3, steps=0)
    assert trained.episodes == 3 and 0 <= trained.dice_mean <= 1
    assert trained.dice_mean > untrained.dice_mean + 0.05
