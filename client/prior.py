"""The site's copy of the public prior, and the global encoder rebuilt on it each round.

Only the trainable parameters travel; the frozen rest is the prior, which every site
holds itself. So the encoder a site trains is rebuilt from its own prior — the ImageNet
weights of the installed package (checked by hash on every load), a file found by hash
in the site's priors folders, or the seeded initialisation — and a site whose prior is
not the one the server names refuses, with instructions.
"""

from __future__ import annotations

from pathlib import Path

from client.settings import RoundSettings, SiteRuntime
from medmeta_common.errors import CheckpointError
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.models.factory import build_encoder, freeze_all_but
from medmeta_common.models.prior import find_prior, prior_sha256


def hash_record(site: SiteRuntime) -> Path:
    """Where the site keeps the hashes of prior files it verified (one per message otherwise)."""
    return site.state_dir / "verified_priors.json"


def prior_file(settings: RoundSettings, site: SiteRuntime) -> Path | None:
    """The site's file of the prior the server names, or ``None`` for a built-in prior."""
    wanted = settings.prior_sha256
    if settings.model.has_file_prior:
        return find_prior(wanted, list(site.priors), record=hash_record(site))
    mine = prior_sha256(settings.model.weights)
    if mine != wanted:
        raise CheckpointError(
            f"site {site.name}: the server's encoder starts from the prior with SHA-256 "
            f"{wanted}, but model.weights {settings.model.weights!r} here is {mine}; the "
            "site and the server must install the same medmeta release and prior")
    return None


def round_encoder(settings: RoundSettings, site: SiteRuntime) -> SharedEncoder:
    """The encoder at its prior, only the round's trainable set requiring gradients."""
    encoder = build_encoder(settings.model, settings.image, settings.seed,
                            prior_file=prior_file(settings, site), hash_record=hash_record(site))
    freeze_all_but(encoder, settings.train.trainable)
    return encoder
