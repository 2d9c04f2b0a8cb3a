"""The hospital engineer's commands: ``adapt``, ``predict`` and ``privacy report``."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from medmeta_common.config.tasks import TASKS

log = logging.getLogger("medmeta")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``adapt``, ``predict`` and ``privacy``."""
    adapt = commands.add_parser(
        "adapt",
        help="adapt the meta-model to this site's task from a few labelled images (local)",
        description="Few-shot adaptation at a new site, entirely local: a prototype classifier "
        "on the meta-learned encoder, optionally fine-tuned. Reports accuracy over many "
        "episodes with disjoint support and query images; --save writes a classifier built "
        "from all the labelled images given.",
    )
    adapt.add_argument("--checkpoint", type=Path, required=True,
                       help="a checkpoint file, or a run directory (its newest checkpoint)")
    adapt.add_argument("--data", required=True,
                       help=".npz, DICOM folder with manifest.csv, or class sub-folders")
    adapt.add_argument("--split", choices=("train", "val", "test"), default=None,
                       help="use only this split of the data (default: all of it)")
    adapt.add_argument("--task", choices=TASKS,
                       default="classification",
                       help="segmentation: --data is a folder of image/mask pairs or volumes "
                       "(docs/data.md); a decoder is adapted and Dice reported")
    adapt.add_argument("--ways", type=int, default=None,
                       help="classes per episode (N; classification only, required there)")
    adapt.add_argument("--shots", type=int, required=True, help="labelled images per class (K)")
    adapt.add_argument("--queries", type=int, default=15, help="query images per class")
    adapt.add_argument("--episodes", type=int, default=None,
                       help="episodes to average over (default 200; segmentation 20)")
    adapt.add_argument("--finetune-steps", type=int, default=None,
                       help="fine-tuning steps on the support images (default 0: prototypes "
                       "only; segmentation: 100 decoder steps)")
    adapt.add_argument("--finetune", choices=("head", "all"), default="head",
                       help="fine-tune the head (segmentation: the decoder) only, or the "
                       "encoder too")
    adapt.add_argument("--tile", type=int, default=128,
                       help="segmentation: tile size for large 2-D images")
    adapt.add_argument("--seed", type=int, default=0, help="seed of the episode draw")
    adapt.add_argument("--policy", choices=("lenient", "strict"), default="lenient",
                       help="bad files: skip and report (lenient) or stop (strict)")
    adapt.add_argument("--save", type=Path, default=None, help="write the adapted model here")
    adapt.add_argument("--json", action="store_true", help="print one JSON object")
    adapt.set_defaults(handler=run_adapt)

    predict = commands.add_parser(
        "predict", help="predict classes for image files with an adapted model",
        description="Class probabilities for a file or a folder of images (DICOM, PNG, JPEG, "
        "TIFF, NIfTI, NRRD) as CSV. Files that cannot be read are listed with the reason.")
    predict.add_argument("--model", type=Path, required=True, help="folder from `adapt --save`")
    predict.add_argument("--input", type=Path, required=True, help="an image file or a folder")
    predict.add_argument("--out", type=Path, default=None,
                         help="CSV file (default: stdout); for a segmentation model, the "
                         "folder for the masks and masks.csv")
    predict.set_defaults(handler=run_predict)

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
                       help="claimed epsilon (default: the config's privacy.epsilon)")
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
    from medmeta_common.config import DataConfig
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
    privacy = getattr(config, "privacy", None)
    epsilon = args.epsilon or (privacy.epsilon if privacy else 8.0)
    max_grad_norm = privacy.max_grad_norm if privacy else 1.0
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


def run_adapt(args: argparse.Namespace) -> int:
    """Evaluate few-shot adaptation at this site and optionally save the adapted model."""
    from client.tasks import get_task
    from client.tasks.base import AdaptRequest
    from medmeta_common.config import DataConfig

    data_path = args.data if args.data.startswith("builtin:") else str(Path(args.data).resolve())
    request = AdaptRequest(
        checkpoint=args.checkpoint, data=DataConfig(path=data_path, split=args.split,
                                                    policy=args.policy),
        shots=args.shots, ways=args.ways, queries=args.queries, episodes=args.episodes,
        finetune_steps=args.finetune_steps, finetune=args.finetune, tile=args.tile,
        seed=args.seed, save=args.save)
    report, summary = get_task(args.task).adapt(request)
    print(json.dumps(report) if args.json else summary)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Predict with a saved model of any task (the task is read from the model)."""
    from client.tasks import get_task, task_names
    from medmeta_common.errors import CheckpointError

    for name in task_names():
        task = get_task(name)
        if task.owns_model(args.model):
            task.predict(args.model, args.input, args.out)
            return 0
    raise CheckpointError(f"{args.model}: no adapted model (create one with `medmeta adapt "
                          "... --save DIR`)")


def run_privacy_report(args: argparse.Namespace) -> int:
    """Print ε spent per site from the ledgers."""
    from medmeta_common.errors import PrivacyBudgetError
    from medmeta_common.privacy.accounting import CONVERSION
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
                atomic_write(path.parent / "privacy_epsilon.png", lambda h, png=png: h.write(png))
                atomic_write_text(target, to_markdown(ledger, "privacy_epsilon.png"))
            print(target)
        return 0
    sites = {}
    for path in paths:
        ledger = read_ledger(path)
        sites[ledger.site] = {"epsilon": ledger.epsilon, "delta": ledger.delta,
                              "steps": ledger.steps, "budget": ledger.epsilon_budget,
                              "unit": ledger.unit, "rounds": len(ledger.rounds)}
    if args.json:
        print(json.dumps({"sites": sites, "accounting": CONVERSION}))
        return 0
    print(f"{'site':<20} {'epsilon':>9} {'budget':>8} {'delta':>9} {'steps':>7}  unit")
    for name, s in sites.items():
        print(f"{name:<20} {s['epsilon']:>9.3f} {s['budget']:>8g} {s['delta']:>9.1e} "
              f"{s['steps']:>7}  {s['unit']}")
    print(f"accounting: {CONVERSION}")
    return 0
