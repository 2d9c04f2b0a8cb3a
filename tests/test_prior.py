"""The public prior: our EfficientNet-Lite0 is the package's, its BatchNorm is DP-safe.

- At every resolution it is used at (classification 64 px, segmentation tiles, odd
  sizes) our network computes what the reference implementation of the weights'
  package computes with its static padding built for that size, on real images.
- Its BatchNorm layers never use batch statistics, in training mode too: one record's
  output and per-sample gradient do not depend on the other records of the batch.
- Our per-sample rule for the FiLM parameters equals single-record gradients, also when
  the rows of a patient are merged into one.
- Only the trainable set travels, and a site whose prior is not the server's refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from PIL import Image

from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.errors import CheckpointError
from medmeta_common.models.efficientnet import (
    ChannelAffine,
    EfficientNetLite0,
    FrozenStatistics,
)
from medmeta_common.models.factory import (
    build_encoder,
    freeze_all_but,
    trainable_arrays,
    trainable_layout,
)
from medmeta_common.models.prior import IMAGENET_SHA256, file_sha256, imagenet_file
from medmeta_common.privacy import grad_samplers  # noqa: F401 - our per-sample rules
from medmeta_common.privacy.dp_sgd import merge_rows
from tests.conftest import shared_file

IMAGE = ImageConfig(size=64, channels=3, intensity="minmax")
IMAGENET = ModelConfig(backbone="efficientnet_lite0", weights="imagenet")


@pytest.fixture(scope="module")
def prior() -> EfficientNetLite0:
    encoder = build_encoder(IMAGENET, IMAGE, 0)
    assert isinstance(encoder, EfficientNetLite0)
    return encoder.eval()


def real_photos(size: int) -> torch.Tensor:
    """Real images in [0, 1]: brain MRI slices as RGB, and a blood-cell crop."""
    with np.load(shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")) as brain:
        grey = brain["test_images"][:3].astype(np.float32) / 255
    with np.load(shared_file("bccd/bccd_cells_32.npz")) as cells:
        rgb = cells["images"][:2].astype(np.float32) / 255
    images = [np.repeat(g[None], 3, axis=0) for g in grey] + [c.transpose(2, 0, 1) for c in rgb]
    resized = [np.asarray(Image.fromarray((i.transpose(1, 2, 0) * 255).astype(np.uint8))
                          .resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
               for i in images]
    return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).copy())


def test_the_wheel_holds_the_pinned_weights() -> None:
    assert file_sha256(imagenet_file()) == IMAGENET_SHA256


@pytest.mark.parametrize("size", [64, 65, 96, 128])
def test_every_resolution_matches_the_reference_implementation(prior: EfficientNetLite0,
                                                               size: int) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    reference.load_state_dict(torch.load(imagenet_file(), weights_only=True))
    reference.eval()
    images = real_photos(size)
    with torch.no_grad():
        theirs = reference.extract_features((images - 0.5) / 0.5)
        ours = prior.stage_outputs(images)[-1]
        logits = reference._fc(ours.mean(dim=(2, 3)))
        reference_logits = reference((images - 0.5) / 0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(1), reference_logits.argmax(1))


def test_the_prior_knows_a_photograph() -> None:
    """ImageNet top-1 on a real photograph at 224 px (matplotlib's sample of Grace Hopper)."""
    import matplotlib.cbook as cbook
    from efficientnet_lite_pytorch import EfficientNet

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    x = torch.from_numpy(np.asarray(photo.resize((224, 224)), np.float32) / 255)
    encoder = build_encoder(IMAGENET, ImageConfig(size=224, channels=3, intensity="minmax"), 0)
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    reference.load_state_dict(torch.load(imagenet_file(), weights_only=True))
    with torch.no_grad():
        features = encoder.eval().stage_outputs(x.permute(2, 0, 1)[None])[-1]  # type: ignore[operator]
        top = int(reference.eval()._fc(features.mean(dim=(2, 3))).argmax())
    assert top == 652  # "military uniform": she wears one


def film_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    encoder = build_encoder(IMAGENET, IMAGE, 0)
    freeze_all_but(encoder, "film")
    head = torch.nn.Linear(encoder.embedding_dim, 3)
    return torch.nn.Sequential(encoder, head).train()


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, 64, 64, generator=generator), torch.arange(n) % 3


def test_no_layer_uses_batch_statistics_in_training_mode() -> None:
    net = film_model()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert any(isinstance(m, FrozenStatistics) for m in net.modules())
    images, _ = batch()
    with torch.no_grad():
        together = net(images)
        alone = torch.cat([net(images[i:i + 1]) for i in range(len(images))])
        other_batch = net(torch.cat([images[:2], torch.zeros(4, 3, 64, 64)]))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[:2], other_batch[:2], rtol=1e-4, atol=1e-5)
    stats = [m for m in net.modules() if isinstance(m, FrozenStatistics)]
    before = stats[0].running_mean.clone()  # type: ignore[operator]
    net(images).sum().backward()
    assert torch.equal(stats[0].running_mean, before)  # type: ignore[arg-type]


def per_sample(net: torch.nn.Module, images: torch.Tensor,
               labels: torch.Tensor) -> dict[str, torch.Tensor]:
    gsm = GradSampleModule(net, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(images), labels, reduction="sum").backward()
    grads = {n: p.grad_sample.detach().clone() for n, p in net.named_parameters()
             if p.requires_grad}
    gsm.to_standard_module()
    return grads


def test_film_per_sample_rule_is_each_records_gradient_alone() -> None:
    images, labels = batch()
    samples = per_sample(film_model(), images, labels)
    assert set(samples) == {n for n, p in film_model().named_parameters() if p.requires_grad}
    for i in (0, 4):
        single = film_model()
        torch.nn.functional.cross_entropy(single(images[i:i + 1]), labels[i:i + 1],
                                          reduction="sum").backward()
        for name, param in single.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(samples[name][i], param.grad, rtol=1e-3, atol=1e-5)
    changed = images.clone()
    changed[2] = 1 - changed[2]
    after = per_sample(film_model(), changed, labels)
    others = [0, 1, 3, 4, 5]
    for name in samples:  # another record's change leaves this record's gradient alone
        torch.testing.assert_close(samples[name][others], after[name][others], rtol=1e-5,
                                   atol=1e-7)


def test_a_patients_rows_merge_into_its_gradient_alone() -> None:
    images, labels = batch()
    patient = torch.tensor([0, 0, 1, 1, 1, 2])
    net = film_model()
    gsm = GradSampleModule(net, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(images), labels, reduction="sum").backward()
    merge_rows(net, patient, 3)
    merged = {n: p.grad_sample.detach().clone() for n, p in net.named_parameters()
              if p.requires_grad}
    gsm.to_standard_module()
    single = film_model()
    rows = patient == 1
    torch.nn.functional.cross_entropy(single(images[rows]), labels[rows],
                                      reduction="sum").backward()
    for name, param in single.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(merged[name][1], param.grad, rtol=1e-3, atol=1e-5)


def test_only_the_trainable_set_travels() -> None:
    encoder = build_encoder(IMAGENET, IMAGE, 0)
    film = trainable_layout(encoder, "film")
    every = trainable_layout(encoder, "all")
    trunk = sum(int(np.prod(shape)) for shape, _ in every.values())
    sent = sum(int(np.prod(shape)) for shape, _ in film.values())
    assert all(".film." in name for name in film)
    assert sent == 42016 and sent / trunk < 0.05
    assert set(trainable_arrays(encoder, "film")) == set(film)
    shift = trainable_layout(encoder, "film_shift")
    assert set(shift) < set(film) and all(n.endswith(".film.bias") for n in shift)
    assert 2 * sum(int(np.prod(shape)) for shape, _ in shift.values()) == sent
    last = trainable_layout(encoder, "film_last_stage")
    assert set(film) < set(last) and any(n.startswith("head.") for n in last)
    assert all(isinstance(m, ChannelAffine) for n, m in encoder.named_modules()
               if n.endswith(".film"))


def test_a_site_with_another_prior_refuses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from client.prior import prior_file
    from client.settings import RoundSettings, SiteRuntime
    from medmeta_common.config import DataConfig, FewShotConfig, PrivacyConfig, TrainConfig

    site = SiteRuntime(name="a", data=DataConfig(path="x"), state_dir=tmp_path,
                       privacy=PrivacyConfig())
    settings = RoundSettings(IMAGE, IMAGENET, TrainConfig(trainable="film"), FewShotConfig(),
                             1, 1, 0, prior_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="must install the same"):
        prior_file(settings, site)
    weights = tmp_path / "synthetic.pt"
    torch.save(EfficientNetLite0().state_dict(), weights)
    file_model = ModelConfig(backbone="efficientnet_lite0", weights=str(weights))
    missing = RoundSettings(IMAGE, file_model, TrainConfig(trainable="film"), FewShotConfig(),
                            1, 1, 0, prior_sha256=file_sha256(weights))
    with pytest.raises(CheckpointError, match="put it in"):
        prior_file(missing, site)  # the site has no copy in its priors folder
    (tmp_path / "priors").mkdir()
    (tmp_path / "priors" / "copy.pt").write_bytes(weights.read_bytes())
    assert prior_file(missing, site) == tmp_path / "priors" / "copy.pt"


def test_the_segmentation_decoder_reads_the_priors_stages() -> None:
    from medmeta_common.models.decoder import Segmenter, build_decoder

    encoder = build_encoder(IMAGENET, IMAGE, 0)
    freeze_all_but(encoder, "film")
    unused = set(encoder.unused_by("features"))
    assert unused and all(n.startswith("head.") for n in unused)  # the decoder reads stage 7
    for name, param in encoder.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    model = Segmenter(encoder, build_decoder(encoder, 2, 0)).train()
    for size in (64, 96):
        logits = model(torch.rand(2, 3, size, size))
        assert logits.shape == (2, 2, size, size)  # upsampled from the half-resolution map
    gsm = GradSampleModule(model, loss_reduction="sum")  # DP-SGD accepts it as it is
    gsm(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(p.grad_sample is not None for p in model.parameters() if p.requires_grad)
    gsm.to_standard_module()


def test_a_verified_hash_is_reused_only_while_the_file_is_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import medmeta_common.models.prior as prior_module

    weights, record = tmp_path / "prior.pt", tmp_path / "state" / "verified_priors.json"
    shutil.copy(imagenet_file(), weights)
    hashed: list[Path] = []
    real = prior_module.file_sha256
    monkeypatch.setattr(prior_module, "file_sha256",
                        lambda path: hashed.append(path) or real(path))
    assert prior_module.verified_sha256(weights, record) == IMAGENET_SHA256
    assert prior_module.verified_sha256(weights, record) == IMAGENET_SHA256
    assert hashed == [weights]  # the second message read the record, not the 19 MB file

    # A same-size rewrite that even restores the modification time is hashed again
    # (its change time moved) and no longer verifies.
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(CheckpointError, match="SHA-256"):
        prior_module.load_verified(weights, IMAGENET_SHA256, "ImageNet prior", record=record)
    assert hashed == [weights, weights]


def test_a_prior_named_by_its_hash_is_still_checked(tmp_path: Path) -> None:
    from medmeta_common.models.prior import find_prior

    fake = tmp_path / f"{IMAGENET_SHA256}.pt"
    fake.write_bytes(b"not the prior")
    with pytest.raises(CheckpointError, match="does not have"):
        find_prior(IMAGENET_SHA256, [tmp_path])
