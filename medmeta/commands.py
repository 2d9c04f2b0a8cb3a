"""The researcher's commands: ``simulate``, and ``config check`` (for anyone).

The operator's commands are in :mod:`server.cli`, the hospital's in :mod:`client.cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medmeta_common.config import FederationConfig, load_config

log = logging.getLogger("medmeta")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``simulate`` and ``config`` commands."""
    simulate = commands.add_parser(
        "simulate",
        help="run a whole federation on this machine, then adapt the held-out site",
        description="Simulate a federation of sites in Flower's simulation engine, with the "
        "same server and site code as production, then adapt the meta-model at the held-out "
        "site. Without --config it runs the built-in SYNTHETIC demo (no data needed).",
    )
    simulate.add_argument("--config", type=Path, default=None,
                          help=f"federation YAML (default: the built-in demo, {DEFAULT_CONFIG})")
    simulate.add_argument("--out", type=Path, default=Path("runs/simulate"),
                          help="run directory: checkpoints, metrics, plots, report.md")
    simulate.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    simulate.add_argument("--resume", action="store_true",
                          help="continue the run in --out from its last checkpoint")
    simulate.add_argument("--json", action="store_true",
                          help="print the held-out result as one JSON object")
    simulate.set_defaults(handler=run_simulate)

    config = commands.add_parser("config", help="validate configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a YAML config file (any kind)")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=run_config_check)


def run_simulate(args: argparse.Namespace) -> int:
    """Run the federation, adapt the held-out site, write the report."""
    import torch

    from client.fewshot import evaluate_fewshot
    from client.meta_model import load_meta_model
    from medmeta.report import baseline_name, write_report
    from medmeta.simulate import run_simulation, with_rounds
    from medmeta_common.data.sources import load_site
    from medmeta_common.errors import ConfigError
    from medmeta_common.models.factory import build_encoder
    from server.state import RunState

    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(source="--rounds", field="rounds", expected="at least 1",
                          found=str(args.rounds))
    config: FederationConfig = with_rounds(load_config(args.config or DEFAULT_CONFIG),
                                           args.rounds)
    if args.config is None:
        log.info("no --config: running the built-in demo federation (SYNTHETIC images)")
    if args.verbose == 0:
        # Each site's own round lines (what a hospital sees) repeat the server's summary
        # here; -v shows them.
        logging.getLogger("medmeta.site").setLevel(logging.WARNING)
    run_simulation(config, args.out, resume=args.resume)

    held_out = baseline = None
    if config.held_out is not None:
        spec = config.held_out
        log.info("adapting the meta-model at the held-out site %s (%d-way %d-shot, %d episodes)",
                 spec.name, spec.fewshot.ways, spec.fewshot.shots, spec.fewshot.episodes)
        meta = load_meta_model(args.out)
        site = load_site(spec.data, meta.image)
        device = torch.device("cpu")
        held_out = evaluate_fewshot(meta.encoder, site.images, site.labels, len(site.classes),
                                    spec.fewshot, seed=config.seed, device=device,
                                    scale=meta.model.cosine_scale)
        # What the new site gets without joining: the federation's starting encoder.
        start = build_encoder(config.model, config.image, config.seed)
        baseline = evaluate_fewshot(start, site.images, site.labels, len(site.classes),
                                    spec.fewshot, seed=config.seed, device=device,
                                    scale=meta.model.cosine_scale)
    report = write_report(args.out, config, RunState(args.out).read_metrics(), held_out,
                          baseline)
    if args.json and held_out is not None:
        print(json.dumps({**held_out.to_json(), "baseline": baseline_name(config.model),
                          "baseline_accuracy_mean":
                          baseline.accuracy_mean if baseline else None}))
    elif held_out is not None and baseline is not None:
        fs = config.held_out.fewshot  # type: ignore[union-attr]
        print(f"\nNew site {config.held_out.name}: {fs.ways}-way {fs.shots}-shot accuracy "  # type: ignore[union-attr]
              f"{100 * held_out.accuracy_mean:.1f}% ± {100 * held_out.accuracy_ci95:.1f} "
              f"({baseline_name(config.model)}: {100 * baseline.accuracy_mean:.1f}% ± "
              f"{100 * baseline.accuracy_ci95:.1f}) over {held_out.episodes} episodes")
    print(f"Report: {report}")
    return 0


def run_config_check(args: argparse.Namespace) -> int:
    """Validate a config file; errors are raised as ConfigError."""
    from medmeta_common.config.deploy import load_any_config

    load_any_config(args.file)
    print(f"{args.file}: OK")
    return 0
