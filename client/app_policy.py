"""The site's verdict on a run's app bundle, from its ``app`` policy, before any code runs.

:func:`judge_bundle` is a pure function of the site's policy, the bundle's bytes and
the run's signature token: it hashes the bytes itself (it never trusts a hash the
SuperLink states) and checks the Ed25519 signature with the keys the site trusts.
The signature check itself is
:func:`medmeta_common.release.verify.check_signature`, the operator's commands' too.
A refusal names one reason a person can act on:

- ``unsigned``: the site trusts release keys, and the run carries no signature;
- ``unknown key``: signed, but by a key the site does not list;
- ``bad signature``: the signature is malformed, does not verify, or is over another
  bundle (this one was changed after it was signed);
- ``hash not allowed``: the site pins bundles by hash, and this one is not pinned.

:func:`announce_policy` says at every ``site start`` what the site will run, and warns
when checking is off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medmeta_common.config.app import AppPolicyConfig
from medmeta_common.release.bundle import sha256_hex
from medmeta_common.release.verify import BAD_SIGNATURE, UNKNOWN_KEY, UNSIGNED, check_signature

log = logging.getLogger("medmeta.site")

HASH_NOT_ALLOWED = "hash not allowed"
REASONS = (UNSIGNED, UNKNOWN_KEY, BAD_SIGNATURE, HASH_NOT_ALLOWED)


@dataclass(frozen=True)
class Verdict:
    """Whether a bundle may run at this site, and why (or why not).

    Attributes
    ----------
    accepted : bool
        True when the bundle's code may be imported.
    reason : str
        For a refusal, one of the module's reasons; for an acceptance, how it was
        vouched for (``allowed hash``, ``signed``, ``unverified``).
    detail : str
        One sentence with the hashes and key fingerprints involved.
    bundle_sha256 : str
        SHA-256 of the bundle as this site received it.

    """

    accepted: bool
    reason: str
    detail: str
    bundle_sha256: str


def judge_bundle(policy: AppPolicyConfig, bundle: bytes, signature: str) -> Verdict:
    """The site's verdict on ``bundle`` with the run's ``signature`` token ("" if none)."""
    digest = sha256_hex(bundle)

    def verdict(accepted: bool, reason: str, detail: str) -> Verdict:
        return Verdict(accepted, reason, detail, digest)

    if policy.source != "bundle":
        return verdict(False, "installed only", "this site runs only its installed medmeta")
    if policy.allow_unverified:
        return verdict(True, "unverified", "app.allow_unverified: true (checking is off)")
    if digest in policy.allowed_hashes:
        return verdict(True, "allowed hash", f"sha256 {digest} is in app.allowed_hashes")
    if not policy.trusted_keys:
        return verdict(False, HASH_NOT_ALLOWED,
                       f"its sha256 {digest[:16]}… is not in app.allowed_hashes "
                       f"({len(policy.allowed_hashes)} pinned)")
    check = check_signature(signature, digest, policy.trusted_keys)
    if check.ok:
        return verdict(True, check.reason, check.detail)
    pinned = ", and its sha256 is not pinned" if policy.allowed_hashes else ""
    if check.reason == UNSIGNED:
        return verdict(False, UNSIGNED, "the run carries no release signature (no "
                       f"`release:` in the operator's server.yaml){pinned}")
    return verdict(False, check.reason, check.detail + pinned)


def describe_policy(policy: AppPolicyConfig) -> str:
    """One sentence: what code this site runs for the operator's runs."""
    if policy.source == "installed":
        return ("only the medmeta installed at this site runs (app.source: installed); the "
                "code in the operator's app bundles is never imported")
    if policy.allow_unverified:
        return ("ANY app bundle the operator sends runs, unchecked (app.allow_unverified: "
                "true)")
    parts = []
    if policy.trusted_keys:
        ids = ", ".join(k.split()[-1] for k in policy.trusted_keys)
        parts.append(f"signed by a trusted release key ({ids})")
    if policy.allowed_hashes:
        parts.append(f"with one of {len(policy.allowed_hashes)} allowed sha256 hashes")
    return "an app bundle runs only when it is " + " or ".join(parts) + "; others are refused"


def announce_policy(site: str, policy: AppPolicyConfig) -> None:
    """Log the site's app policy at start; warn when bundles run unchecked."""
    if policy.source == "bundle" and policy.allow_unverified:
        log.warning("site %s runs ANY app bundle the operator sends, unverified "
                    "(app.allow_unverified: true): that code can read this site's images. "
                    "List app.trusted_keys or app.allowed_hashes, or use app.source: "
                    "installed", site)
        return
    log.info("site %s: %s", site, describe_policy(policy))
