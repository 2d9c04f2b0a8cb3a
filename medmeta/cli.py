"""The ``medmeta`` command: one entry point for the operator, the hospital and the researcher.

Each person's commands live with their code: the operator's in :mod:`server.cli`,
the hospital's in :mod:`client.cli`, the researcher's in :mod:`medmeta.commands`.

Errors a user can cause are reported in one line with an exit code (see
:mod:`medmeta_common.errors`); ``--debug`` shows the traceback of anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from client import cli as hospital_commands
from medmeta import __version__
from medmeta import commands as researcher_commands
from medmeta.logs import configure_logging
from medmeta_common.errors import MedmetaError
from server import cli as operator_commands

log = logging.getLogger("medmeta")


def build_parser() -> argparse.ArgumentParser:
    """The full command tree."""
    parser = argparse.ArgumentParser(
        prog="medmeta",
        description="Federated meta-learning for hospitals: learn a shared image encoder "
        "across sites under differential privacy, adapt it locally from a few examples.",
    )
    parser.add_argument("--version", action="version", version=f"medmeta {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    researcher_commands.register(commands)
    certs = commands.add_parser("certs", help="make the consortium's certificates and keys")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    operator_commands.register(commands, certs_commands)
    hospital_commands.register(commands, certs_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return int(args.handler(args) or 0)
    except MedmetaError as exc:
        print(f"medmeta: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medmeta: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"medmeta: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for the traceback, and please report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
