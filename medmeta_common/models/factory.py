"""Build the encoder from configuration (both sides build exactly the same network)."""

from __future__ import annotations

import torch

from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.models.encoder import PRESETS, Encoder, EncoderSpec


def encoder_spec(model: ModelConfig, image: ImageConfig) -> EncoderSpec:
    """The encoder architecture a model config describes."""
    widths, convs = PRESETS[model.preset]
    return EncoderSpec(
        in_channels=image.channels,
        widths=model.widths or widths,
        convs_per_stage=model.convs_per_stage or convs,
        norm_groups=model.norm_groups,
        weight_standardization=model.weight_standardization,
    )


def build_encoder(model: ModelConfig, image: ImageConfig, seed: int) -> Encoder:
    """A freshly initialised encoder, identical for the same config and seed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Encoder(encoder_spec(model, image))
    finally:
        torch.random.set_rng_state(generator_state)
