"""Build the shared encoder from configuration; which of its parameters train and travel.

Both sides build exactly the same network: the same architecture, the same prior (by
hash, :mod:`medmeta_common.models.prior`) or the same seeded initialisation. Of its
parameters only the *trainable* set (``train.trainable``) is trained under DP-SGD,
sent, screened and meta-updated; the rest stays the prior's everywhere.

- ``all``: every parameter (the small/large CNNs trained from scratch);
- ``film``: EfficientNet-Lite0's BatchNorm scale and shift (FiLM; Perez et al. 2018) —
  about 42 thousand of its 3.4 million parameters (Shysheya et al. 2023, FiT;
  Tobaben et al. 2023);
- ``film_shift``: only the FiLM shifts (BatchNorm biases; Bu et al. 2022, DP-BiTFiT):
  half of FiLM's coordinates;
- ``film_last_stage``: FiLM and the last block group and head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.models.efficientnet import EfficientNetLite0, load_package_weights
from medmeta_common.models.encoder import PRESETS, Encoder, EncoderSpec, SharedEncoder
from medmeta_common.models.prior import IMAGENET_SHA256, imagenet_file, load_verified

M = TypeVar("M", bound=torch.nn.Module)

Layout = dict[str, tuple[tuple[int, ...], str]]


def encoder_spec(model: ModelConfig, image: ImageConfig) -> EncoderSpec:
    """The small/large CNN architecture a model config describes."""
    widths, convs = PRESETS[model.backbone]
    return EncoderSpec(
        in_channels=image.channels,
        widths=model.widths or widths,
        convs_per_stage=model.convs_per_stage or convs,
        norm_groups=model.norm_groups,
        weight_standardization=model.weight_standardization,
    )


def build_encoder(model: ModelConfig, image: ImageConfig, seed: int, *,
                  prior_file: Path | None = None,
                  hash_record: Path | None = None) -> SharedEncoder:
    """The encoder at its start: the prior's weights, or a seeded initialisation.

    ``prior_file`` is the weights file of a file prior (the server reads
    ``model.weights``; a site passes the file it found by hash). ``hash_record`` keeps
    the ImageNet file's verified hash between processes (a site's state directory).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if model.backbone != "efficientnet_lite0":
            return Encoder(encoder_spec(model, image))
        encoder = EfficientNetLite0(pool=model.pool)
    finally:
        torch.random.set_rng_state(generator_state)
    if model.weights == "imagenet":
        load_package_weights(encoder, load_verified(imagenet_file(), IMAGENET_SHA256,
                                                    "ImageNet prior", record=hash_record))
    elif model.has_file_prior:
        path = prior_file or Path(model.weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a prior of this backbone "
                             f"({str(exc).splitlines()[0]})") from None
    return encoder


def seeded(build: Callable[[], M], seed: int) -> M:
    """``build()`` with torch's global generator at ``seed``, restored afterwards.

    A site's fresh head or decoder is then the same for the same seed (data-independent)
    without disturbing the caller's random stream.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def has_film(backbone: str) -> bool:
    """Whether ``backbone`` has BatchNorm scale/shift (FiLM) parameters to train alone."""
    return backbone == "efficientnet_lite0"


def trainable_names(encoder: torch.nn.Module, trainable: str) -> list[str]:
    """The parameters of ``encoder`` in the trainable set, in registration order."""
    names = [name for name, _ in encoder.named_parameters()]
    if trainable == "all":
        return names
    if not isinstance(encoder, EfficientNetLite0):
        raise ValueError(f"train.trainable {trainable!r} needs a backbone with BatchNorm "
                         "(efficientnet_lite0)")
    film = [n for n in names if ".film." in n]
    if trainable == "film":
        return film
    if trainable == "film_shift":
        return [n for n in film if n.endswith(".bias")]
    if trainable == "film_last_stage":
        last = f"stages.{len(encoder.stages) - 1}."
        return [n for n in names if n in film or n.startswith((last, "head."))]
    raise ValueError(f"unknown trainable set {trainable!r}")


def freeze_all_but(encoder: torch.nn.Module, trainable: str) -> list[str]:
    """Let only the trainable set require gradients; its names."""
    names = set(trainable_names(encoder, trainable))
    for name, param in encoder.named_parameters():
        param.requires_grad_(name in names)
    return [n for n, _ in encoder.named_parameters() if n in names]


def trainable_layout(encoder: torch.nn.Module, trainable: str) -> Layout:
    """Expected ``name -> (shape, dtype)`` of an encoder update (the trainable set)."""
    params = dict(encoder.named_parameters())
    return {n: (tuple(params[n].shape), "float32") for n in trainable_names(encoder, trainable)}


def layout_for(model: ModelConfig, image: ImageConfig, trainable: str) -> Layout:
    """The trainable layout of an architecture, without loading any prior's weights."""
    return trainable_layout(build_encoder(replace(model, weights="none"), image, 0), trainable)


def trainable_arrays(encoder: torch.nn.Module, trainable: str) -> dict[str, np.ndarray]:
    """The trainable set as float32 NumPy arrays (CPU)."""
    params = dict(encoder.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32).numpy().copy()
            for n in trainable_names(encoder, trainable)}


def load_trainable(encoder: torch.nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]
                   ) -> None:
    """Set the parameters named in ``arrays``; every name must be a parameter of ``encoder``."""
    params = dict(encoder.named_parameters())
    unknown = sorted(set(arrays) - set(params))
    if unknown:
        raise ValueError(f"not parameters of this encoder: {unknown[:3]}")
    with torch.no_grad():
        for name, value in arrays.items():
            tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor)
                                     else value)
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
