"""The hospital engineer's commands: ``site``, ``certs site``, ``data``, ``adapt``, ``predict``.

A hospital creates its SuperNode key pair (``certs site``), checks and starts its site
client (``site check`` / ``site start``), looks at its data (``data inspect``), and at
a new site adapts the meta-model locally (``adapt``) and predicts with the result
(``predict``); the ``privacy`` commands are in :mod:`client.privacy_cli`. The
operator's commands are in :mod:`server.cli`, the researcher's in :mod:`medmeta.commands`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from client import privacy_cli
from medmeta_common.cli_output import print_written, warn_insecure
from medmeta_common.config.tasks import DEFAULT_TILE, TASKS

log = logging.getLogger("medmeta")

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def register(commands: Commands, certs_commands: Commands) -> None:
    """Add the hospital's commands (and ``certs site`` to the ``certs`` group)."""
    site = certs_commands.add_parser("site", help="a SuperNode key pair (hospital)")
    site.add_argument("--out", type=Path, required=True, help="where the site keeps its keys")
    site.add_argument("--name", required=True, help="the site's name, e.g. hospital-a")
    site.add_argument("--force", action="store_true", help="replace existing files")
    site.set_defaults(handler=run_certs_site)


    hospital = commands.add_parser("site", help="run this hospital's site client")
    hospital_commands = hospital.add_subparsers(dest="site_command", required=True)
    site_start = hospital_commands.add_parser(
        "start", help="check the set-up, then run the SuperNode (foreground)")
    site_start.add_argument("--config", type=Path, required=True, help="site.yaml")
    site_start.set_defaults(handler=run_site_start)
    site_check = hospital_commands.add_parser(
        "check", help="check data, keys and the connection to the server (an authenticated "
        "handshake: an unregistered key fails here); start nothing")
    site_check.add_argument("--config", type=Path, required=True, help="site.yaml")
    site_check.set_defaults(handler=run_site_check)

    data = commands.add_parser("data", help="look at a site's data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser(
        "inspect",
        help="count images per class, patients, sizes and modalities; list unreadable files",
        description="Read a site's data the way training will, and report what is there. "
        "PATH is a .npz file, a folder with manifest.csv, a folder of class sub-folders, "
        "or builtin:demo/site-N. Nothing printed contains DICOM identifying fields.",
    )
    inspect.add_argument("path", help="the site's data")
    inspect.add_argument("--split", choices=("train", "val", "test"), default=None,
                         help="only this split (default: all records)")
    inspect.add_argument("--policy", choices=("lenient", "strict"), default="lenient",
                         help="strict: stop at the first bad file; lenient: skip and list each")
    inspect.add_argument("--frames", choices=("middle", "all"), default="middle",
                         help="multi-frame DICOM / 3-D volumes: middle frame or every frame")
    inspect.add_argument("--manifest", default="manifest.csv",
                         help="manifest file name in a DICOM folder (default: manifest.csv)")
    inspect.add_argument("--classes", default=None,
                         help="comma-separated class list; labels outside it are errors "
                         "(default: the classes the source names)")
    inspect.add_argument("--shots", type=int, default=5,
                         help="K of the episodes the data must serve (default 5): a class with "
                         "fewer than K+Q images is named with its files")
    inspect.add_argument("--queries", type=int, default=10,
                         help="Q, query images per class of an episode (default 10)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=run_inspect)

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
                       "(docs/data.md), a decoder is adapted and Dice reported; detection: "
                       "--data is a Pascal VOC folder, a COCO JSON or a folder with boxes.csv, "
                       "--shots annotated images train a head and mAP@0.5 is reported")
    adapt.add_argument("--ways", type=int, default=None,
                       help="classes per episode (N; classification only, required there)")
    adapt.add_argument("--shots", type=int, required=True,
                       help="labelled images per class (K); segmentation and detection: "
                       "annotated images")
    adapt.add_argument("--queries", type=int, default=15,
                       help="query images per class (detection: every other image is a query)")
    adapt.add_argument("--episodes", type=int, default=None,
                       help="episodes to average over (default: classification 60 with "
                       "FiLM fine-tuning, else 200; segmentation 20; detection 10)")
    adapt.add_argument("--finetune-steps", type=int, default=None,
                       help="fine-tuning steps on the support images (default 0: prototypes "
                       "only; segmentation: 100 decoder steps)")
    adapt.add_argument("--finetune", choices=("head", "film", "all"), default=None,
                       help="fine-tune the head (segmentation: the decoder) only, with the "
                       "encoder's FiLM parameters (BatchNorm scale and shift; "
                       "efficientnet_lite0), or with the whole encoder (default: the task's "
                       "measured best, docs/method.md)")
    adapt.add_argument("--tile", type=int, default=DEFAULT_TILE,
                       help="segmentation and detection: images whose longest side exceeds 1.5 "
                       "tiles are cut into tiles of this many pixels (detection: choose it so "
                       "objects are 1/10 to 1/3 of a tile, docs/data.md)")
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
                         "folder for the masks and masks.csv; for a detection model, the "
                         "folder for boxes.csv, boxes.json and overlays/")
    predict.set_defaults(handler=run_predict)

    privacy_cli.register(commands)


def run_certs_site(args: argparse.Namespace) -> int:
    """Create a site's SuperNode key pair."""
    from medmeta_common.pki import site_keypair

    written = site_keypair(args.out, name=args.name, force=args.force)
    print(f"Key pair for site {args.name} created.")
    print_written(written, "stays at the hospital; site.yaml's private_key",
             "send it to the operator, who lists it under sites: in server.yaml")
    return 0


def run_site_check(args: argparse.Namespace) -> int:
    """Check the site's set-up and connection."""
    from client.app_policy import describe_policy
    from client.handshake import check_key_pair, handshake
    from client.site import check_episode_classes
    from client.supernode import preflight
    from medmeta_common.config.deploy import load_site_config

    config = load_site_config(args.config)
    if config.insecure:
        warn_insecure(f"site {config.name}")
    preflight(config)
    check_key_pair(config)
    node = handshake(config, args.config)
    check_episode_classes(config.data, config.task, config.name)
    who = "" if node is None else f"; the SuperLink knows this site's key (node {node})"
    print(f"site {config.name}: data, state directory, keys and the connection to "
          f"{config.superlink} look right{who}")
    print(f"site {config.name}: {describe_policy(config.app)}")
    return 0


def run_site_start(args: argparse.Namespace) -> int:
    """Check, then run the SuperNode in the foreground."""
    from client.app_policy import announce_policy
    from client.handshake import check_key_pair
    from client.supernode import preflight, run_supernode
    from medmeta_common.config.deploy import load_site_config

    config = load_site_config(args.config)
    if config.insecure:
        warn_insecure(f"site {config.name}")
    announce_policy(config.name, config.app)
    if not config.privacy.enabled:
        log.warning("site %s trains WITHOUT differential privacy (privacy.enabled: false)",
                    config.name)
    preflight(config)
    check_key_pair(config)
    log.info("site %s: starting the SuperNode (connects to %s)", config.name, config.superlink)
    return run_supernode(config, args.config)


def run_inspect(args: argparse.Namespace) -> int:
    """Inspect a site's data and print the report."""
    from medmeta_common.config import DataConfig
    from medmeta_common.data.inspect import (
        check_sparse_classes,
        format_report,
        inspection_report,
    )
    from medmeta_common.data.sources import read_raw

    path = args.path if args.path.startswith("builtin:") else str(Path(args.path).expanduser())
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    data = DataConfig(path=path, split=args.split, policy=args.policy, frames=args.frames,
                      manifest=args.manifest, classes=classes)
    site = read_raw(data)
    needed = max(1, args.shots) + max(1, args.queries)
    if args.policy == "strict":  # lenient: the report names them as a warning
        check_sparse_classes(site, "strict", args.path, needed)
    report = inspection_report(site, args.split, needed)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, args.path))
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
