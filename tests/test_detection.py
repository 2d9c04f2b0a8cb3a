"""Detection: a per-image loss (the DP oracle), exact targets and decoding, real-data training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data.box_utils import box_iou
from opacus import GradSampleModule

from client.round import freeze_unreachable, local_training
from client.tasks import get_task
from client.tasks.detection_adapt import adapt_detection, evaluate_fewshot_detection
from client.tasks.detection_predict import detect_in_image
from client.tasks.detection_training import batch_loss
from medmeta_common.config import DataConfig, ImageConfig, ModelConfig, TrainConfig
from medmeta_common.config.data import PartitionConfig
from medmeta_common.data.detection import DetectionData, to_source_coords
from medmeta_common.data.images import read_image_file
from medmeta_common.data.sources import load_detection
from medmeta_common.models.detection import (
    Detector,
    build_head,
    decode,
    make_targets,
    per_image_loss,
    unreached_parameters,
)
from medmeta_common.models.factory import build_encoder
from medmeta_common.privacy import grad_samplers  # noqa: F401 - our per-sample rules
from medmeta_common.privacy.dp_sgd import DPSettings
from tests.conftest import shared_file

SIZE = 64
CLASSES = 3


def detector(backbone: str = "cnn") -> Detector:
    model = ModelConfig(backbone=backbone, weights="none") if backbone != "cnn" else ModelConfig()
    encoder = build_encoder(model, ImageConfig(size=SIZE, channels=3), 0)
    unreached = set(unreached_parameters(encoder))
    for name, param in encoder.named_parameters():  # as a detection round freezes them
        param.requires_grad_(name not in unreached)
    return Detector(encoder, build_head(encoder, CLASSES, 0))


def some_boxes(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=rows)
    row = np.repeat(np.arange(rows), counts)
    corner = rng.uniform(0, SIZE - 20, size=(len(row), 2))
    extent = rng.uniform(4, 20, size=(len(row), 2))
    boxes = np.concatenate([corner, corner + extent], axis=1)
    return (torch.tensor(boxes, dtype=torch.float32),
            torch.from_numpy(rng.integers(0, CLASSES, len(row))), torch.from_numpy(row))


def per_sample_grads(net: Detector, images: torch.Tensor, boxes: torch.Tensor,
                     labels: torch.Tensor, rows: torch.Tensor,
                     normalise_by_batch: bool = False) -> list[torch.Tensor]:
    gsm = GradSampleModule(net, loss_reduction="sum")
    output = gsm(images)
    if normalise_by_batch:  # the stock CenterNet/FCOS normaliser: positives of the batch
        targets = make_targets(boxes, labels, rows, batch=len(images), classes=CLASSES,
                               grid=tuple(output.shape[-2:]), stride=SIZE / output.shape[-1])
        terms = per_image_loss(output, targets) * targets.counts.clamp(min=1)
        (terms.sum() / max(1, len(boxes))).backward()
    else:
        batch_loss(output, boxes, labels, rows, classes=CLASSES, input_size=SIZE).backward()
    samples = [p.grad_sample.detach().clone() for p in net.parameters() if p.requires_grad]
    gsm.to_standard_module()
    for p in net.parameters():
        p.grad = None
        p.grad_sample = None
    return samples


@pytest.mark.parametrize("backbone", ["cnn", "efficientnet_lite0"])
def test_another_images_boxes_do_not_move_this_images_per_sample_gradient(backbone: str) -> None:
    generator = torch.Generator().manual_seed(0)  # synthetic: the property is the loss's
    images = torch.rand(3, 3, SIZE, SIZE, generator=generator)
    boxes, labels, rows = some_boxes(0, 3)
    net = detector(backbone)
    before = per_sample_grads(net, images, boxes, labels, rows)
    # Image 2 gets other boxes (more of them): image 0's per-sample gradient must not move.
    keep = rows != 2
    more, more_labels, _ = some_boxes(1, 1)
    changed = (torch.cat([boxes[keep], more]), torch.cat([labels[keep], more_labels]),
               torch.cat([rows[keep], torch.full((len(more),), 2)]))
    after = per_sample_grads(net, images, *changed)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-6)
    # And it is the gradient of image 0 alone.
    single = detector(backbone)
    mine = rows == 0
    batch_loss(single(images[:1]), boxes[mine], labels[mine], rows[mine], classes=CLASSES,
               input_size=SIZE).backward()
    trained = [p for p in single.parameters() if p.requires_grad]
    for sample, param in zip(before, trained, strict=True):
        torch.testing.assert_close(sample[0], param.grad, rtol=1e-4, atol=1e-5)


def test_the_oracle_catches_a_batch_normalised_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, SIZE, SIZE, generator=generator)
    boxes, labels, rows = some_boxes(0, 3)
    net = detector()
    before = per_sample_grads(net, images, boxes, labels, rows, normalise_by_batch=True)
    more, more_labels, _ = some_boxes(1, 1)  # image 2 gets more boxes
    after = per_sample_grads(net, images, torch.cat([boxes, more]),
                             torch.cat([labels, more_labels]),
                             torch.cat([rows, torch.full((len(more),), 2)]),
                             normalise_by_batch=True)
    assert any(not torch.allclose(b[0], a[0], rtol=1e-4, atol=1e-6)
               for b, a in zip(before, after, strict=True))


def test_perfect_maps_decode_into_the_boxes() -> None:
    boxes = torch.tensor([[4.0, 8.0, 20.0, 30.0], [30.0, 30.0, 50.0, 44.0]])
    labels, rows = torch.tensor([0, 2]), torch.tensor([0, 0])
    grid, stride = (16, 16), 4.0
    targets = make_targets(boxes, labels, rows, batch=1, classes=CLASSES, grid=grid,
                           stride=stride)
    output = torch.zeros(1, CLASSES + 4, *grid)
    output[:, :CLASSES] = torch.logit(targets.heat.clamp(1e-4, 1 - 1e-4))
    for (y, x), size, offset in zip(targets.cells, targets.size, targets.offset, strict=True):
        output[0, CLASSES:CLASSES + 2, y, x] = size
        output[0, CLASSES + 2:, y, x] = offset
    found = decode(output, CLASSES, stride, top_k=2)[0]
    order = np.argsort(found.labels)
    np.testing.assert_allclose(found.boxes[order], boxes.numpy(), atol=1e-3)
    np.testing.assert_array_equal(found.labels[order], labels.numpy())


# --- real data: BCCD blood smears ---------------------------------------------------------

IMAGE = ImageConfig(size=64, channels=3, intensity="minmax")
LITE0 = ModelConfig(backbone="efficientnet_lite0", weights="imagenet", pool=(5,))


@pytest.fixture(scope="module")
def bccd() -> dict[str, DetectionData]:
    folder = shared_file("bccd/BCCD")
    return {part: load_detection(DataConfig(path=str(folder), split=split,  # type: ignore[arg-type]
                                            partition=PartitionConfig(parts, 0)), IMAGE, tile=240)
            for part, split, parts in (("train", "train", 8), ("val", "val", 2))}


def test_dp_rounds_train_encoder_and_head_on_real_slides_with_slides_as_records(
        bccd: dict[str, DetectionData], tmp_path: Path) -> None:
    task = get_task("detection")
    data = bccd["train"]
    units = task.privacy_units(data, "image", source="test")
    assert units is not None and len(set(units)) == len(np.unique(data.sources)) < len(data)
    encoder = build_encoder(ModelConfig(), ImageConfig(size=64, channels=3), 0)
    freeze_unreachable(encoder, task)
    model = Detector(encoder, build_head(encoder, len(data.classes), 0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = TrainConfig(local_steps=2, batch_size=8)
    rate = task.sampling(data, train).rate
    local_training(task, model, data, train, dp=DPSettings(1.0, rate, 1.0), seed=0,
                   device=torch.device("cpu"), amp=False, units=units)
    moved = {k.split(".")[0] for k, v in model.state_dict().items()
             if not torch.equal(before[k], v)}
    assert moved == {"encoder", "head"}


def test_a_few_annotated_slides_teach_the_prior_to_find_cells(
        bccd: dict[str, DetectionData]) -> None:
    encoder = build_encoder(LITE0, IMAGE, 0)
    val = bccd["val"]
    trained = evaluate_fewshot_detection(encoder, val, shots=5, episodes=2, steps=200)
    untrained = evaluate_fewshot_detection(encoder, val, shots=5, episodes=2, steps=0)
    assert trained.episodes == 2 and 0 <= trained.map_mean <= trained.map50_mean <= 1
    assert trained.map50_mean > untrained.map50_mean + 0.1


def test_predicted_boxes_land_on_the_annotated_cells_of_an_unseen_slide(
        bccd: dict[str, DetectionData]) -> None:
    from client.meta_model import MetaModel

    encoder = build_encoder(LITE0, IMAGE, 0)
    meta = MetaModel(encoder=encoder, image=IMAGE, model=LITE0, round=0, federation="test")
    adapted = adapt_detection(meta, bccd["train"], steps=300, finetune="head", tile=240)
    slide = shared_file("bccd/BCCD/JPEGImages/BloodImage_00007.jpg")  # a test-list slide
    found = detect_in_image(adapted, read_image_file(slide).frames[0])
    truth = load_detection(DataConfig(path=str(shared_file("bccd/BCCD")), split="test"),
                           IMAGE, tile=None)
    row = truth.refs.index("BloodImage_00007.jpg")
    boxes, labels = truth.boxes_of(row)
    gt = to_source_coords(truth, row, boxes)
    confident = found.boxes[found.scores >= 0.3]
    assert len(confident) > 0
    iou = np.asarray(box_iou(torch.from_numpy(gt), torch.from_numpy(confident.astype(np.float64))))
    rbc = np.array([truth.classes[int(k)] == "RBC" for k in labels])
    recall = (iou.max(axis=1) >= 0.5)[rbc].mean()
    precision = (iou.max(axis=0) >= 0.5).mean()
    assert recall >= 0.4 and precision >= 0.4, (recall, precision)
