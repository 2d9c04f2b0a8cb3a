"""The hospital engineer's commands: ``adapt``, ``predict`` and ``privacy report``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
    adapt.add_argument("--ways", type=int, required=True, help="classes per episode (N)")
    adapt.add_argument("--shots", type=int, required=True, help="labelled images per class (K)")
    adapt.add_argument("--queries", type=int, default=15, help="query images per class")
    adapt.add_argument("--episodes", type=int, default=200, help="episodes to average over")
    adapt.add_argument("--finetune-steps", type=int, default=0,
                       help="fine-tuning steps on the support images (0: prototypes only)")
    adapt.add_argument("--finetune", choices=("head", "all"), default="head",
                       help="fine-tune the head only, or the encoder too")
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
    predict.add_argument("--out", type=Path, default=None, help="CSV file (default: stdout)")
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


def run_adapt(args: argparse.Namespace) -> int:
    """Evaluate few-shot adaptation and optionally save the adapted classifier."""
    from client.adapt import adapt, evaluate_site, load_meta_model, save_adapted
    from medmeta_common.config import DataConfig, FewShotConfig
    from medmeta_common.data.sources import load_site
    from medmeta_common.typed_config import build

    fewshot = build(FewShotConfig, {"ways": args.ways, "shots": args.shots,
                                    "queries": args.queries, "episodes": args.episodes,
                                    "finetune_steps": args.finetune_steps}, source="command line")
    data_path = args.data if args.data.startswith("builtin:") else str(Path(args.data).resolve())
    data = DataConfig(path=data_path, split=args.split, policy=args.policy)
    meta = load_meta_model(args.checkpoint)
    result = evaluate_site(meta, data, fewshot, seed=args.seed, finetune=args.finetune)
    if args.save is not None:
        adapted = adapt(meta, load_site(data, meta.image), finetune_steps=args.finetune_steps,
                        finetune=args.finetune)
        path = save_adapted(adapted, args.save)
        log.info("adapted model for classes %s written to %s", list(adapted.classes), path)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.ways}-way {result.shots}-shot accuracy: "
              f"{100 * result.accuracy_mean:.1f}% ± {100 * result.accuracy_ci95:.1f} "
              f"(95% interval over {result.episodes} episodes; meta-model of round {meta.round})")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Write predictions as CSV."""
    from client.adapt import load_adapted
    from client.predict import input_files, predict, predictions_csv, write_predictions

    model = load_adapted(args.model)
    files = input_files(args.input)
    root = args.input if args.input.is_dir() else args.input.parent
    predictions = predict(model, files, root=root)
    if args.out is None:
        sys.stdout.write(predictions_csv(predictions, model.classes))
    else:
        write_predictions(predictions, model.classes, args.out)
    failed = sum(p.error is not None for p in predictions)
    log.info("%d file(s) predicted, %d could not be read%s", len(predictions) - failed, failed,
             f"; written to {args.out}" if args.out else "")
    return 0


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
