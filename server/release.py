"""The release manager's commands: ``release keygen``, ``release sign``, ``release verify``.

A consortium's release manager (often the operator) makes one Ed25519 release key,
hands its public half to every hospital, and signs each app bundle the consortium
agrees to run. ``release sign`` builds the bundle exactly as the SuperLink will ship
it (Flower's builder, from the app folder) or takes an existing ``.fab``, and writes
the bundle and its signature (``.sig``) side by side; ``server start`` submits that
bundle with its signature when ``server.yaml`` names it as ``release:``. Hospitals
check bundles at their site (:mod:`client.app_policy`); ``release verify`` runs the
same signature check here.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from medmeta_common.checkpoint import atomic_write, atomic_write_text
from medmeta_common.cli_output import print_written
from medmeta_common.release import ReleaseError
from medmeta_common.release.bundle import (
    build_bundle,
    bundle_filename,
    bundle_metadata,
    read_bundle,
    sha256_hex,
)
from medmeta_common.release.keys import (
    PASSPHRASE_ENV,
    generate_release_key,
    key_id,
    load_signing_key,
    public_key_text,
    read_public_key,
)
from medmeta_common.release.statement import (
    read_statement,
    sign_bundle,
    signature_path,
)
from medmeta_common.release.verify import check_signature

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def register(commands: Commands) -> None:
    """Add the ``release`` command group."""
    release = commands.add_parser("release", help="sign app releases the sites can check "
                                  "(release manager)")
    verbs = release.add_subparsers(dest="release_command", required=True)
    keygen = verbs.add_parser("keygen", help="make the consortium's Ed25519 release key",
                              description="Write NAME.key (private, mode 0600, never "
                              "overwritten) and NAME.pub (the line hospitals list under "
                              "app.trusted_keys).")
    keygen.add_argument("--out", type=Path, required=True, help="folder for the key pair")
    keygen.add_argument("--name", required=True, help="key name, e.g. consortium-release-2026")
    keygen.add_argument("--passphrase", action="store_true",
                        help=f"encrypt the private key with a passphrase (asked for, or "
                        f"${PASSPHRASE_ENV})")
    keygen.set_defaults(handler=run_release_keygen)
    sign = verbs.add_parser(
        "sign", help="sign the exact app bundle the sites will receive",
        description="Build the app bundle (FAB) as the SuperLink ships it, or take one with "
        "--bundle, sign its SHA-256 with the release key, and write BUNDLE.fab and "
        "BUNDLE.fab.sig into --out. Name the .fab as `release:` in server.yaml.")
    sign.add_argument("--key", type=Path, required=True, help="the release private key")
    sign.add_argument("--out", type=Path, required=True, help="folder for the release")
    source = sign.add_mutually_exclusive_group()
    source.add_argument("--app", type=Path, default=None,
                        help="the Flower app folder to build (default: this medmeta)")
    source.add_argument("--bundle", type=Path, default=None, help="an existing .fab to sign")
    sign.add_argument("--json", action="store_true", help="print one JSON object")
    sign.set_defaults(handler=run_release_sign)
    verify = verbs.add_parser(
        "verify", help="check a bundle's signature against trusted keys",
        description="The signature check the sites make: is BUNDLE signed, exactly as it is, "
        "by one of the --trusted-key keys? Exit code 0 when it is.")
    verify.add_argument("--bundle", type=Path, required=True, help="the .fab")
    verify.add_argument("--signature", type=Path, default=None,
                        help="its .sig (default: beside the bundle)")
    verify.add_argument("--trusted-key", action="append", required=True,
                        help="a .pub file or an 'ssh-ed25519 ...' line (repeat for each)")
    verify.set_defaults(handler=run_release_verify)


def run_release_keygen(args: argparse.Namespace) -> int:
    """Make a release key pair."""
    passphrase = None
    if args.passphrase:
        passphrase = (os.environ.get(PASSPHRASE_ENV)
                      or getpass.getpass("passphrase for the new release key: ")).encode()
        if not passphrase:
            raise ReleaseError("an empty passphrase encrypts nothing; drop --passphrase or "
                               "give one")
    written = generate_release_key(args.out, name=args.name, passphrase=passphrase)
    public = read_public_key(str(written.public[0]))
    print(f"Release key {args.name} created ({key_id(public)}).")
    print_written(written, "signs releases: keep it offline, with as few people as possible",
                  "every hospital lists it under app.trusted_keys in site.yaml")
    return 0


def run_release_sign(args: argparse.Namespace) -> int:
    """Build (or take) a bundle, sign it, write the release."""
    from server.superlink import APP_DIR

    key = load_signing_key(args.key)
    bundle = read_bundle(args.bundle) if args.bundle else build_bundle(args.app or APP_DIR)
    app, version = bundle_metadata(bundle)
    bundle_path = args.out.resolve() / bundle_filename(bundle)
    sig_path = signature_path(bundle_path)
    if sig_path.exists():
        raise ReleaseError(f"{sig_path} exists: this bundle is already signed (delete the "
                           "file to sign it again)")
    statement = sign_bundle(bundle, key, app=app, version=version, key_name=args.key.stem)
    if not (bundle_path.is_file() and bundle_path.read_bytes() == bundle):
        atomic_write(bundle_path, lambda handle: handle.write(bundle))
    atomic_write_text(sig_path, statement.to_json())
    for published in (bundle_path, sig_path):
        published.chmod(0o644)  # both are public: sites and auditors read them
    digest = sha256_hex(bundle)
    if args.json:
        print(json.dumps({"app": app, "version": version, "bundle": str(bundle_path),
                          "signature": str(sig_path), "sha256": digest,
                          "key_id": statement.key_id}))
        return 0
    print(f"Release {app} {version} signed by {statement.key_id}.")
    print(f"  bundle    : {bundle_path}")
    print(f"  signature : {sig_path}")
    print(f"  sha256    : {digest}")
    print(f"Operator: `release: {bundle_path}` in server.yaml, then `medmeta server start`.")
    print("Hospitals: `app: {source: bundle, trusted_keys: [<the .pub>]}` in site.yaml, or "
          f"pin this bundle: `allowed_hashes: [{digest}]`.")
    return 0


def run_release_verify(args: argparse.Namespace) -> int:
    """Check a bundle's signature against trusted keys."""
    bundle = read_bundle(args.bundle)
    statement = read_statement(args.signature or signature_path(args.bundle))
    keys = []
    for source in args.trusted_key:
        try:
            keys.append(read_public_key(source))
        except ValueError as exc:
            raise ReleaseError(f"--trusted-key {source}: {exc}") from None
    check = check_signature(statement, sha256_hex(bundle), [public_key_text(k) for k in keys])
    if not check.ok:
        raise ReleaseError(f"{args.bundle}: refused: {check.reason}: {check.detail}")
    print(f"{args.bundle}: {check.detail}; sha256 {sha256_hex(bundle)}")
    return 0
