"""``medmeta simulate``: a whole federation on one machine, in Flower's simulation engine.

The same ServerApp and ClientApp code as production, with the sites' data and state
folders taken from a federation config. After the rounds, the held-out site adapts
the meta-model locally and the run directory gets a report.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.app import Context

from client.app import make_client_app
from client.site import SiteRuntime
from medmeta_common.checkpoint import atomic_write_json
from medmeta_common.config import FederationConfig
from medmeta_common.config.fingerprint import SCHEMA_VERSION
from medmeta_common.errors import CheckpointError, FederationError
from server.app import make_server_app
from server.state import RunState

log = logging.getLogger("medmeta.simulate")


@dataclass(frozen=True)
class SimulatedSites:
    """Maps a simulated node (Flower's ``partition-id``) to a configured site."""

    config: FederationConfig
    out_dir: Path

    def __call__(self, context: Context) -> SiteRuntime:
        """The site this node plays."""
        site = self.config.sites[int(context.node_config["partition-id"])]
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
        )


def prepare_run_dir(config: FederationConfig, out_dir: Path, *, resume: bool) -> None:
    """Refuse to overwrite an earlier run; record the resolved config."""
    state = RunState(out_dir)
    if not resume and state.checkpoints():
        raise CheckpointError(f"{out_dir} already holds a run (checkpoints/); use --resume to "
                              "continue it or another --out for a new run")
    if resume:
        state.check_resumable(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    from dataclasses import asdict

    atomic_write_json(out_dir / "config.json", {"config_hash": config.hash(),
                                                "config_schema": SCHEMA_VERSION, **asdict(config)})


def warn_about_privacy(config: FederationConfig) -> None:
    """Say loudly, at every start, which sites train without DP."""
    for site in config.sites:
        privacy = config.privacy_of(site)
        if not privacy.enabled:
            log.warning("site %s trains WITHOUT differential privacy (privacy.enabled: false)",
                        site.name)
        else:
            log.info("site %s: DP-SGD, budget epsilon=%.2f, clip %.2f, privacy unit: %s",
                     site.name, privacy.epsilon, privacy.max_grad_norm, privacy.unit)


def run_simulation(config: FederationConfig, out_dir: Path, *, resume: bool = False) -> None:
    """Run the federation rounds in Flower's simulation engine (Ray backend)."""
    from flwr.simulation import run_simulation as flower_run_simulation

    prepare_run_dir(config, out_dir, resume=resume)
    warn_about_privacy(config)
    cpus = os.cpu_count() or 1
    per_site = min(config.runtime.cpus_per_site, float(cpus))
    gpus = 0.0
    if config.runtime.device != "cpu":
        import torch

        if torch.cuda.is_available():
            gpus = min(1.0, 1.0 / max(1, len(config.sites)))
    backend = {
        "client_resources": {"num_cpus": per_site, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.ERROR},
    }
    abort = threading.Event()
    started = time.monotonic()
    log.info("simulating %d site(s) for %d round(s) in Flower's simulation engine; output in %s",
             len(config.sites), config.rounds, out_dir)
    try:
        flower_run_simulation(
            server_app=make_server_app(config, out_dir, resume=resume, abort=abort),
            client_app=make_client_app(SimulatedSites(config, out_dir)),
            num_supernodes=len(config.sites),
            backend_config=backend,  # type: ignore[arg-type]
        )
    except RuntimeError as exc:
        cause = exc.__cause__ or exc
        raise FederationError(f"the simulated federation failed: {cause}") from exc
    finally:
        abort.set()  # a ServerApp thread still waiting for replies gives up now
        _shutdown_ray()
    log.info("federation finished in %.0f s", time.monotonic() - started)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        log.debug("ray shutdown failed", exc_info=True)


def with_rounds(config: FederationConfig, rounds: int | None) -> FederationConfig:
    """The config with ``--rounds`` applied."""
    return config if rounds is None else replace(config, rounds=rounds)
