"""``medmeta simulate``: a whole federation on one machine.

The same ServerApp code (:func:`server.app.run_federation`, Flower's round loop with
our strategy) and the same ClientApp (:mod:`client.app`) as production, connected by
an in-process Grid (:mod:`medmeta.inprocess`) instead of a SuperLink; the sites' data
and state folders come from a federation config. After the rounds, the held-out site
adapts the meta-model locally and the run directory gets a report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from client.app import make_client_app
from client.simulated import SimulatedSites
from medmeta.inprocess import InProcessGrid, Mod
from medmeta_common.config import FederationConfig
from medmeta_common.errors import CheckpointError, FederationError
from server.app import run_federation
from server.flwr_simulation import announce_site_privacy
from server.state import RunState

log = logging.getLogger("medmeta.simulate")


def prepare_run_dir(config: FederationConfig, out_dir: Path, *, resume: bool) -> None:
    """Refuse to overwrite an earlier run; record the resolved config."""
    state = RunState(out_dir)
    if not resume and state.checkpoints():
        raise CheckpointError(f"{out_dir} already holds a run (checkpoints/); use --resume to "
                              "continue it or another --out for a new run")
    if resume:
        state.check_resumable(config)
    state.record_config(config)


def run_simulation(config: FederationConfig, out_dir: Path, *, resume: bool = False,
                   mods: Mapping[str, Sequence[Mod]] | None = None) -> InProcessGrid:
    """Run the federation's rounds in this process; the grid holds every site reply.

    ``mods`` adds ClientApp mods at chosen sites (by name), e.g. a hostile site of
    :mod:`medmeta.attacks`.
    """
    prepare_run_dir(config, out_dir, resume=resume)
    announce_site_privacy(config)
    names = [s.name for s in config.sites]
    unknown = sorted(set(mods or {}) - set(names))
    if unknown:
        raise FederationError(f"no site(s) {unknown} in the federation to attach mods to")
    grid = InProcessGrid(
        make_client_app(SimulatedSites(config, out_dir)),
        [{"partition-id": i, "num-partitions": len(names)} for i in range(len(names))],
        mods={names.index(n): list(m) for n, m in (mods or {}).items()}, seed=config.seed)
    started = time.monotonic()
    log.info("simulating %d site(s) for %d round(s); output in %s", len(config.sites),
             config.rounds, out_dir)
    run_federation(grid, config, out_dir, resume=resume)
    log.info("federation finished in %.0f s", time.monotonic() - started)
    return grid


def with_rounds(config: FederationConfig, rounds: int | None) -> FederationConfig:
    """The config with ``--rounds`` applied."""
    return config if rounds is None else replace(config, rounds=rounds)
