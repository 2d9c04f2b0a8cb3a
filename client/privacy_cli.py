"""The hospital's privacy commands: ``privacy report`` (ε spent) and ``privacy audit``."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("medmeta")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``privacy`` command group."""
    privacy = commands.add_parser("privacy", help="privacy ledgers of sites")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    report = privacy_commands.add_parser(
        "report", help="epsilon spent per site",
        description="Read the privacy ledger of a site state directory, or of every site in a "
        "simulation run directory (sites/<name>/).")
    report.add_argument("--state", type=Path, required=True, help="state or run directory")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.add_argument("--format", choices=("text", "md", "html"), default="text",
                        help="md/html: write a report a privacy officer can file, per site, "
                        "into the site's state directory")
    report.set_defaults(handler=run_privacy_report)

    audit = privacy_commands.add_parser(
        "audit", help="empirical epsilon lower bound from canaries (fails if above the claim)",
        description="One-run privacy audit (Steinke, Nasr & Jagielski 2023): train the "
        "method's DP-SGD once on this site's data plus random canaries, each included with "
        "probability 1/2, then guess which canaries were included. The hits give an "
        "epsilon lower bound at 95%% confidence. Fails (exit 7) if the bound exceeds the "
        "claimed epsilon, or if the non-private control shows no leakage (a blind audit). "
        "Everything stays on this machine.")
    audit.add_argument("--config", type=Path, required=True,
                       help="the federation or server YAML whose method is audited")
    audit.add_argument("--data", default=None,
                       help="the site's data (default: the first site of a federation config)")
    audit.add_argument("--epsilon", type=float, default=None,
                       help="claimed epsilon (default: the config's privacy.epsilon; for a "
                       "server config, which has none, privacy.epsilon's default)")
    audit.add_argument("--steps", type=int, default=300,
                       help="DP-SGD steps; the noise is calibrated so that they spend exactly "
                       "the claimed epsilon (default: 300, enough for the non-private "
                       "control to memorise canaries)")
    audit.add_argument("--records", type=int, default=None,
                       help="audit on a random subset of this many of the site's images")
    audit.add_argument("--batch-size", type=int, default=None,
                       help="expected records per step (default: the method's batch size)")
    audit.add_argument("--canaries", type=int, default=200, help="canaries (half included)")
    audit.add_argument("--guesses", type=int, default=40,
                       help="membership guesses on each side (in / out)")
    audit.add_argument("--no-control", action="store_true",
                       help="skip the non-private control run")
    audit.add_argument("--min-control-epsilon", type=float, default=1.0,
                       help="the control must show at least this lower bound")
    audit.add_argument("--noise-multiplier", type=float, default=None,
                       help="train with this noise instead of the calibrated one, to check "
                       "that the audit catches a broken setting (e.g. 0)")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    audit.set_defaults(handler=run_privacy_audit)


def run_privacy_audit(args: argparse.Namespace) -> int:
    """Audit the method's DP-SGD on a site's data; fail loudly if the claim is contradicted."""
    import numpy as np

    from client.audit import classification_mechanism
    from medmeta_common.config import DataConfig, PrivacyConfig
    from medmeta_common.config.deploy import load_any_config
    from medmeta_common.data.sources import load_site
    from medmeta_common.errors import ConfigError, PrivacyAuditError
    from medmeta_common.privacy.canary_audit import audit_mechanism

    config = load_any_config(args.config)
    if getattr(config, "kind", "") == "site":
        raise ConfigError(source=str(args.config), field="kind", expected="a federation or "
                          "server config (the method to audit)", found="'site'")
    if args.data is not None:
        data = DataConfig(path=args.data, split=None)
    elif getattr(config, "sites", None):
        data = config.sites[0].data  # type: ignore[union-attr]
    else:
        raise ConfigError(source="--data", field="data", expected="the site's data path",
                          found="nothing (a server config names no site data)")
    # A server config names no site privacy: the settings' own defaults apply.
    privacy = getattr(config, "privacy", None) or PrivacyConfig()
    epsilon = args.epsilon if args.epsilon is not None else privacy.epsilon
    max_grad_norm = privacy.max_grad_norm
    site = load_site(data, config.image)  # type: ignore[union-attr]
    if args.records is not None and args.records < len(site.labels):
        site = site.subset(np.random.default_rng(args.seed).permutation(
            len(site.labels))[:args.records])
    train = config.train  # type: ignore[union-attr]
    if args.batch_size is not None:
        train = replace(train, batch_size=args.batch_size)
    log.info("auditing %d DP-SGD steps at epsilon %g on %s (%d images) with %d canaries",
             args.steps, epsilon, data.path, len(site.labels), args.canaries)
    mechanism = classification_mechanism(config.image, config.model, train,  # type: ignore[union-attr]
                                         steps=args.steps, max_grad_norm=max_grad_norm)
    outcome = audit_mechanism(site, mechanism, epsilon=epsilon, canaries=args.canaries,
                              guesses_per_side=args.guesses, control=not args.no_control,
                              seed=args.seed, noise_multiplier_used=args.noise_multiplier)
    problem = outcome.problem(args.min_control_epsilon)
    runs = {"dp": outcome.dp, "control": outcome.control}
    figures = {name: {"epsilon_lower_bound": r.result.epsilon_lower_bound,
                      "correct": r.result.correct, "guesses": r.result.guesses,
                      "claimed_epsilon": r.claimed_epsilon,
                      "noise_multiplier": r.noise_multiplier,
                      "noise_multiplier_trained": r.noise_multiplier_trained,
                      "sample_rate": r.sample_rate, "steps": r.steps, "delta": r.delta}
               for name, r in runs.items() if r is not None}
    if args.json:
        print(json.dumps({"runs": figures, "canaries": args.canaries, "confidence": 0.95,
                          "passed": problem is None, "problem": problem}))
    else:
        for name, f in figures.items():
            claim = f"claimed {f['claimed_epsilon']:g}" if f["claimed_epsilon"] else "no DP"
            print(f"{name:<8} {claim:<14} lower bound {f['epsilon_lower_bound']:.2f} "
                  f"({f['correct']}/{f['guesses']} guesses right, 95% confidence)")
    if problem:
        raise PrivacyAuditError(f"privacy audit failed: {problem}")
    return 0


def run_privacy_report(args: argparse.Namespace) -> int:
    """Print ε spent per site from the ledgers."""
    from medmeta_common.errors import PrivacyBudgetError
    from medmeta_common.privacy.accounting import CONVERSIONS
    from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger

    state: Path = args.state
    paths = [state / LEDGER_FILE] if (state / LEDGER_FILE).exists() else sorted(
        state.glob(f"sites/*/{LEDGER_FILE}"))
    if not paths:
        raise PrivacyBudgetError(f"{state}: no privacy ledger found (expected {LEDGER_FILE} or "
                                 f"sites/<name>/{LEDGER_FILE})")
    if args.format in ("md", "html"):
        from medmeta_common.checkpoint import atomic_write, atomic_write_text
        from medmeta_common.privacy.report import epsilon_plot_png, to_html, to_markdown

        for path in paths:
            ledger = read_ledger(path)
            target = path.parent / f"privacy_report.{args.format}"
            if args.format == "html":
                atomic_write_text(target, to_html(ledger))
            else:
                png = epsilon_plot_png(ledger)
                atomic_write(path.parent / "privacy_epsilon.png", png_writer(png))
                atomic_write_text(target, to_markdown(ledger, "privacy_epsilon.png"))
            print(target)
        return 0
    sites: dict[str, dict[str, Any]] = {}
    for path in paths:
        ledger = read_ledger(path)
        sites[ledger.site] = {"epsilon": ledger.epsilon, "delta": ledger.delta,
                              "steps": ledger.steps, "budget": ledger.epsilon_budget,
                              "unit": ledger.unit, "rounds": len(ledger.rounds),
                              "accountant": ledger.accountant}
    if args.json:
        print(json.dumps({"sites": sites, "accounting": {
            name: CONVERSIONS[s["accountant"]] for name, s in sites.items()}}))
        return 0
    print(f"{'site':<20} {'epsilon':>9} {'budget':>8} {'delta':>9} {'steps':>7}  unit")
    for name, s in sites.items():
        print(f"{name:<20} {s['epsilon']:>9.3f} {s['budget']:>8g} {s['delta']:>9.1e} "
              f"{s['steps']:>7}  {s['unit']}")
    for name in sorted({s["accountant"] for s in sites.values()}):
        print(f"accounting ({name}): {CONVERSIONS[name]}")
    return 0


def png_writer(png: bytes) -> Callable[[IO[bytes]], object]:
    """A writer of ``png`` for :func:`~medmeta_common.checkpoint.atomic_write`."""
    return lambda handle: handle.write(png)
