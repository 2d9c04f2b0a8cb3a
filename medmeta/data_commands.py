"""``medmeta data inspect`` and ``medmeta config check``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medmeta_common.config import DataConfig
from medmeta_common.config.deploy import load_any_config
from medmeta_common.data.inspect import format_report, inspection_report
from medmeta_common.data.sources import read_raw


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``data`` and ``config`` command groups."""
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
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=run_inspect)

    config = commands.add_parser("config", help="validate configuration files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a YAML config file")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=run_config_check)


def run_inspect(args: argparse.Namespace) -> int:
    """Inspect a site's data and print the report."""
    path = args.path if args.path.startswith("builtin:") else str(Path(args.path).expanduser())
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    data = DataConfig(path=path, split=args.split, policy=args.policy, frames=args.frames,
                      manifest=args.manifest, classes=classes)
    site = read_raw(data)
    report = inspection_report(site, args.split)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, args.path))
    return 0


def run_config_check(args: argparse.Namespace) -> int:
    """Validate a config file; errors are raised as ConfigError."""
    load_any_config(args.file)
    print(f"{args.file}: OK")
    return 0
