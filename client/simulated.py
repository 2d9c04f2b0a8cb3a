"""Simulated sites: which configured site a simulated Flower node plays.

Flower's simulation gives each node only ``partition-id`` and ``num-partitions``;
node *i* plays the federation's *i*-th site, with its state (privacy ledger, local
head) in ``<run dir>/sites/<name>``. ``medmeta simulate`` (its in-process grid) and
``flwr run .`` (Flower's simulation runtime, the federation named in the run config:
:mod:`medmeta_common.config.flwr_run`) map nodes to sites the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from client.settings import SiteRuntime
from medmeta_common.config import FederationConfig, load_config
from medmeta_common.config.flwr_run import federation_path, simulation_run_dir
from medmeta_common.errors import FederationError
from medmeta_common.models.prior import PRIORS_DIR


@dataclass(frozen=True)
class SimulatedSites:
    """Maps a simulated node (Flower's ``partition-id``) to a configured site."""

    config: FederationConfig
    out_dir: Path

    def __call__(self, context: Context) -> SiteRuntime:
        """The site this node plays."""
        index = int(context.node_config["partition-id"])
        if not 0 <= index < len(self.config.sites):
            raise FederationError(
                f"simulated node {index} has no site: federation '{self.config.name}' has "
                f"{len(self.config.sites)} site(s), Flower started "
                f"{context.node_config.get('num-partitions', '?')} node(s); run with "
                f"--federation-config \"num-supernodes={len(self.config.sites)}\"")
        site = self.config.sites[index]
        return SiteRuntime(
            name=site.name,
            data=site.data,
            state_dir=self.out_dir / "sites" / site.name,
            privacy=self.config.privacy_of(site),
            val_fraction=site.val_fraction,
            device=self.config.runtime.device,
            amp=self.config.runtime.amp,
            threads=max(1, int(self.config.runtime.cpus_per_site)),
            task=site.task,
            tile=site.tile,
            prior_folders=(self.out_dir / PRIORS_DIR,),
        )


def site_from_run_config(context: Context) -> SiteRuntime:
    """Under ``flwr run`` in simulation: the site of the run config's federation."""
    path = federation_path(context.run_config)
    return _sites(str(path), path.stat().st_mtime, context.run_id,
                  str(context.run_config.get("run-dir", "") or ""))(context)


@functools.lru_cache(maxsize=4)
def _sites(path: str, mtime: float, run_id: int, run_dir: str) -> SimulatedSites:
    config = load_config(path)
    return SimulatedSites(config, simulation_run_dir({"run-dir": run_dir}, run_id, config.name))
