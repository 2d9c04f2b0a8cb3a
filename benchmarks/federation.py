"""An in-process federation for benchmarks: the same site and server code, no transport.

Each round every site runs :func:`client.rounds.train_round` (DP-SGD, ledger and all)
on a copy of the global encoder; the server screens each returned encoder with
:func:`server.update_checks.screen_update`, combines the accepted ones with
:func:`server.aggregation.aggregate` (``server.aggregator``) and applies
:class:`server.meta_update.MetaOptimizer` — exactly what the Flower strategy does,
minus the messages, so that many configurations can be compared quickly (and on
machines without Ray). An optional ``tamper`` hook replaces what chosen sites send,
to simulate hostile or broken sites. ``medmeta simulate`` is the real
thing; ``tests/test_federation.py`` runs that.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.rounds import RoundSettings, train_round
from client.site import SiteRuntime, site_splits
from client.train import train_cosine
from medmeta_common.config import FederationConfig
from medmeta_common.data.records import SiteData
from medmeta_common.models.encoder import Encoder
from medmeta_common.models.factory import build_encoder
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.protocol import layout_of
from medmeta_common.update_codec import decode_update, encode_update, payload_bytes
from medmeta_common.wire import encoder_to_numpy
from server.aggregation import server_target
from server.meta_update import MetaOptimizer
from server.update_checks import screen_update, update_norm

# (site name, round, global encoder, the site's encoder) -> what the site sends instead.
Tamper = Callable[[str, int, Mapping[str, np.ndarray], dict[str, np.ndarray]],
                  dict[str, np.ndarray]]

log = logging.getLogger("benchmark")


def settings_of(config: FederationConfig, round_number: int) -> RoundSettings:
    """What the server would send in round ``round_number``."""
    return RoundSettings(image=config.image, model=config.model, train=config.train,
                         evaluation=config.evaluation, planned_rounds=config.rounds,
                         server_round=round_number, seed=config.seed)


def runtimes(config: FederationConfig, state_root: Path, device: str) -> list[SiteRuntime]:
    """One site runtime per configured site, each with its own state directory."""
    return [SiteRuntime(name=s.name, data=s.data, state_dir=state_root / s.name,
                        privacy=config.privacy_of(s), val_fraction=s.val_fraction,
                        device=device, amp=config.runtime.amp,
                        threads=max(1, torch.get_num_threads()), task=s.task, tile=s.tile)
            for s in config.sites]


def run_inprocess(config: FederationConfig, state_root: Path, *, device: str = "cpu",
                  initial: Encoder | None = None,
                  tamper: Tamper | None = None) -> tuple[Encoder, list[dict]]:
    """Train the federation; return the final encoder and one record per round.

    Parameters
    ----------
    config : FederationConfig
        The federation; ``config.server`` picks the aggregator and the update checks.
    state_root : Path
        Where each site keeps its state (ledger, head), one folder per site.
    device : str
        Where sites train.
    initial : Encoder, optional
        The starting global encoder (default: a fresh one from ``config``).
    tamper : callable, optional
        ``tamper(site, round, global_encoder, site_encoder)`` returns what the site
        sends instead of its encoder (an attack); called for every site that trained.

    """
    sites = runtimes(config, state_root, device)
    encoder = initial if initial is not None else build_encoder(config.model, config.image,
                                                                config.seed)
    layout = layout_of(encoder)
    state = encoder_to_numpy(encoder)
    meta = MetaOptimizer(config.server, state)
    server = config.server
    noise = np.random.default_rng(secrets.randbits(128))  # central DP: never the run seed
    history = []
    for round_number in range(1, config.rounds + 1):
        started = time.monotonic()
        settings = settings_of(config, round_number)
        states, weights, epsilons = [], [], {}
        statuses: dict[str, dict[str, Any]] = {}
        for site in sites:
            local = copy.deepcopy(encoder)
            outcome = train_round(site, settings, local)
            epsilons[site.name] = outcome.metrics.get("epsilon")
            if outcome.encoder is None:
                statuses[site.name] = {"status": "refused"}
                continue
            sent = encoder_to_numpy(outcome.encoder)
            if tamper is not None:
                sent = tamper(site.name, round_number, state, sent)
            sent_bytes = payload_bytes(sent)
            if server.update_encoding != "float32":  # what travels, and what the server decodes
                wire = encode_update(sent, state, server.update_encoding)
                sent_bytes = payload_bytes(wire)
                sent = decode_update(wire, state, server.update_encoding)
            problem = screen_update(sent, state, layout, max_update_norm=server.max_update_norm)
            if problem:
                log.warning("rejected update from site %s: %s", site.name, problem)
                statuses[site.name] = {"status": "rejected", "reason": problem}
                continue
            statuses[site.name] = {"status": "accepted", "update_bytes": sent_bytes,
                                   "update_norm": update_norm(sent, state)}
            states.append(sent)
            weights.append(float(outcome.metrics["num-examples"]))
        if len(states) >= config.min_sites:
            target = server_target(states, weights, state, server, sites_asked=len(sites),
                                   rng=noise)
            state = meta.step(state, target)
            encoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        else:
            log.warning("round %d: %d accepted update(s), fewer than min_sites=%d; the global "
                        "encoder is kept", round_number, len(states), config.min_sites)
        history.append({"round": round_number, "accepted": len(states), "epsilon": epsilons,
                        "sites": statuses, "seconds": time.monotonic() - started})
        log.info("round %d/%d: %d sites, %.1f s", round_number, config.rounds, len(states),
                 history[-1]["seconds"])
    return encoder.cpu().eval(), history


def pooled_training_data(config: FederationConfig, state_root: Path) -> SiteData:
    """All sites' training records in one set, each site's classes kept distinct."""
    parts, offset, classes = [], 0, []
    for site in runtimes(config, state_root, "cpu"):
        train = site_splits(site, config.image, config.seed).train
        parts.append(replace(train, labels=train.labels + offset))
        classes += [f"{site.name}/{c}" for c in train.classes]
        offset += len(train.classes)
    return SiteData(images=np.concatenate([p.images for p in parts]),
                    labels=np.concatenate([p.labels for p in parts]), classes=tuple(classes),
                    groups=np.concatenate([p.groups for p in parts]),
                    refs=tuple(r for p in parts for r in p.refs))


def run_centralized(config: FederationConfig, state_root: Path, *, steps: int,
                    device: str = "cpu") -> Encoder:
    """Non-private training on the pooled data (the upper bound), same recipe otherwise."""
    data = pooled_training_data(config, state_root)
    encoder = build_encoder(config.model, config.image, config.seed)
    head = CosineClassifier(encoder.embedding_dim, len(data.classes), config.model.cosine_scale)
    model = EncoderWithHead(encoder, head)
    train = replace(config.train, local_steps=steps, ways=None)
    rate = min(1.0, train.batch_size / len(data))
    train_cosine(model, data, train, dp=None, sample_rate=rate, seed=config.seed,
                 device=torch.device(device), amp=config.runtime.amp)
    return encoder.cpu().eval()
