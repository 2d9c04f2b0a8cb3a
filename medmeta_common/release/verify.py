"""One signature check: does a release signature vouch for exactly this bundle.

One check for everyone: the site before it runs a bundle
(:func:`client.app_policy.judge_bundle`), the operator before publishing or submitting
a release (``medmeta release sign``, ``release verify``, ``server start``). The signer
is matched by its key's bytes, and the signature verified with the *trusted* key,
never with anything the statement claims about itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medmeta_common.release.keys import key_id, parse_public_key, raw_bytes
from medmeta_common.release.statement import ReleaseStatement, statement_from_token

UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown key"
BAD_SIGNATURE = "bad signature"


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome: ``ok``, or a ``reason`` (one of this module's) with a ``detail``."""

    ok: bool
    reason: str
    detail: str


def check_signature(signature: ReleaseStatement | str, bundle_sha256: str,
                    trusted_keys: Sequence[str]) -> SignatureCheck:
    """Check ``signature`` (a statement, or its run-config token; "" for none).

    Parameters
    ----------
    signature : ReleaseStatement or str
        The release statement, or its token as it arrives in the run config.
    bundle_sha256 : str
        SHA-256 of the bundle, computed by the caller from the bundle's bytes.
    trusted_keys : sequence of str
        OpenSSH lines of the keys whose signatures are accepted.

    """
    if isinstance(signature, str):
        if not signature:
            return SignatureCheck(False, UNSIGNED, "the run carries no release signature")
        try:
            signature = statement_from_token(signature)
        except ValueError as exc:
            return SignatureCheck(False, BAD_SIGNATURE,  # short: it travels in an error
                                  f"the release signature is malformed ({str(exc)[:60]})")
    signer = parse_public_key(signature.public_key)
    trusted = {raw_bytes(k): k for k in map(parse_public_key, trusted_keys)}
    key = trusted.get(raw_bytes(signer))
    if key is None:
        return SignatureCheck(False, UNKNOWN_KEY, f"it is signed by key {key_id(signer)}, "
                              f"not one of the {len(trusted)} trusted key(s)")
    if not signature.verifies_under(key):
        return SignatureCheck(False, BAD_SIGNATURE,
                              f"the signature does not verify under key {key_id(key)}")
    if signature.bundle_sha256 != bundle_sha256:
        return SignatureCheck(False, BAD_SIGNATURE,
                              f"signed for sha256 {signature.bundle_sha256[:16]}…, received "
                              f"{bundle_sha256[:16]}…: it was changed after it was signed")
    return SignatureCheck(True, "signed", f"{signature.app} {signature.version} signed by "
                          f"{key_id(key)} at {signature.signed_at}")
