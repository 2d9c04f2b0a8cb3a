"""What ``medmeta server start`` submits: a signed release exactly as signed, or the source.

With ``release: <bundle>.fab`` in server.yaml the bundle and its ``.sig`` are checked
against each other (a bundle changed after signing stops here, before any site sees
it), staged as a folder that Flower rebuilds to exactly the signed bytes, and
submitted with the signature in the run config, where each site reads it. Without
``release:`` the app is built from the installed source and goes out unsigned, with a
warning: sites that trust only signed releases will refuse it.

The operator's checks here are a convenience; the guarantee is each site's own check
(:mod:`client.app_policy`), since an operator's tools can be bypassed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medmeta_common.config.deploy import ServerConfig
from medmeta_common.release import ReleaseError
from medmeta_common.release.bundle import read_bundle, sha256_hex, stage_bundle
from medmeta_common.release.statement import RUN_CONFIG_KEY, read_statement, signature_path
from medmeta_common.release.verify import check_signature

log = logging.getLogger("medmeta.server")


def release_submission(config: ServerConfig, state_dir: Path,
                       source_dir: Path) -> tuple[Path, dict[str, str]]:
    """The app folder for ``flwr run`` and the run-config entries that go with it."""
    if config.release is None:
        log.warning("no `release:` in server.yaml: the app built from %s goes to the sites "
                    "UNSIGNED; sites that run only signed releases (app.trusted_keys) will "
                    "refuse it (sign one with `medmeta release sign`)", source_dir)
        return source_dir, {}
    bundle_path = Path(config.release)
    bundle = read_bundle(bundle_path)
    statement = read_statement(signature_path(bundle_path))
    # Integrity only (signature and hash agree); whom to trust is each site's decision.
    check = check_signature(statement, sha256_hex(bundle), [statement.public_key])
    if not check.ok:
        raise ReleaseError(f"release {bundle_path}: {check.reason}: {check.detail}; it would "
                           "be refused by every site that checks signatures")
    folder = stage_bundle(bundle, state_dir / "releases")
    log.info("submitting release %s %s (sha256 %s…, signed by %s)", statement.app,
             statement.version, statement.bundle_sha256[:16], statement.key_id)
    return folder, {RUN_CONFIG_KEY: statement.to_token()}
