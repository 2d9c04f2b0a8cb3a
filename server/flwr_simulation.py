"""``flwr run .`` in Flower's simulation runtime: the ServerApp side.

The run config names a federation YAML (``federation``; default ``configs/demo.yaml``,
the built-in demo) and a run directory (``run-dir``), see
:mod:`medmeta_common.config.flwr_run`. Simulated node *i* plays the federation's
*i*-th site (:mod:`client.simulated`). When Flower starts a different number of nodes
than the federation has sites:

- more nodes than sites: the run stops at once with an error (a node without a site
  cannot train), naming the ``num-supernodes`` to use;
- fewer nodes: the sites without a node are left out (logged by name) and the others
  run, as long as there are at least ``server.min_sites`` of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid

from medmeta_common.config import FederationConfig, load_config
from medmeta_common.config.flwr_run import federation_path, simulation_run_dir
from medmeta_common.errors import FederationError
from server.state import RunState

log = logging.getLogger("medmeta.server")


def announce_site_privacy(config: FederationConfig) -> None:
    """Say loudly, at every start, which sites train without DP."""
    for site in config.sites:
        privacy = config.privacy_of(site)
        if not privacy.enabled:
            log.warning("site %s trains WITHOUT differential privacy (privacy.enabled: false)",
                        site.name)
        else:
            log.info("site %s: DP-SGD, budget epsilon=%.2f, clip %.2f, privacy unit: %s",
                     site.name, privacy.epsilon, privacy.max_grad_norm, privacy.unit)


def simulated_node_count(grid: Grid, timeout: float = 60.0, settle: float = 0.5) -> int:
    """How many simulated nodes Flower registered (it registers them all at start)."""
    deadline = time.monotonic() + timeout
    count, stable_since = 0, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
        elif count and time.monotonic() - stable_since >= settle:
            return count
        time.sleep(0.1)
    return count


def fit_to_nodes(config: FederationConfig, nodes: int) -> FederationConfig:
    """The federation as ``nodes`` simulated nodes can play it (see the module docstring)."""
    sites = len(config.sites)
    if nodes > sites:
        raise FederationError(
            f"Flower started {nodes} simulated nodes, but federation '{config.name}' has "
            f"{sites} site(s): a node without a site cannot train. Run with "
            f"--federation-config \"num-supernodes={sites}\"")
    if nodes < config.min_sites:
        raise FederationError(
            f"Flower started {nodes} simulated node(s), fewer than federation "
            f"'{config.name}'s min_sites={config.min_sites}. Run with "
            f"--federation-config \"num-supernodes={sites}\"")
    if nodes < sites:
        left_out = [s.name for s in config.sites[nodes:]]
        log.warning("Flower started %d simulated node(s) for %d site(s): %s take(s) no part "
                    "(run with --federation-config \"num-supernodes=%d\" to play every site)",
                    nodes, sites, ", ".join(left_out), sites)
        return replace(config, sites=config.sites[:nodes])
    return config


def prepare_simulated_federation(grid: Grid, context: Context, *, rounds: int | None
                                  ) -> tuple[FederationConfig, Path, bool]:
    """The run config's federation fitted to the nodes, its run directory, and resume.

    :func:`server.app.production_main` then runs it (this module never imports the app).
    """
    path = federation_path(context.run_config)
    config = load_config(path)
    if rounds is not None:
        config = replace(config, rounds=rounds)
    out_dir = simulation_run_dir(context.run_config, context.run_id, config.name)
    log.info("simulating federation '%s' (%s) in Flower's simulation runtime", config.name,
             path)
    config = fit_to_nodes(config, simulated_node_count(grid))
    state = RunState(out_dir)
    resume = bool(state.checkpoints())
    if resume:
        state.check_resumable(config)
    state.record_config(config)
    announce_site_privacy(config)
    log.info("run directory: %s (checkpoints, metrics, the sites' privacy ledgers)", out_dir)
    return config, out_dir, resume
