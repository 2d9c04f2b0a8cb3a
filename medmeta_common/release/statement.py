"""The signature statement of a release: what is signed, and the forms it travels in.

A statement names the bundle by its SHA-256 and carries the signer's public key and an
Ed25519 signature over the statement's other fields. The signed bytes are a fixed
domain prefix followed by the canonical JSON of those fields (sorted keys, no
whitespace), so a signature can never be mistaken for one over anything else.

It travels in two forms:

- the ``.sig`` file beside the bundle (indented JSON), published with the release;
- one base64url token in the run config (``release-signature``), which
  ``medmeta server start`` sets so that every site receives it with the run.

A bundle cannot vouch for itself: the statement is over the bundle's hash, so it can
never be inside the bundle it signs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medmeta_common.release import ReleaseError
from medmeta_common.release.keys import key_id, parse_public_key, public_key_text

FORMAT = "medmeta-release-signature/1"
DOMAIN = b"medmeta release signature v1\n"
# The run-config key the statement travels in (declared in pyproject.toml's app config).
RUN_CONFIG_KEY = "release-signature"
SIG_SUFFIX = ".sig"


@dataclass(frozen=True)
class ReleaseStatement:
    """A signed statement that ``bundle_sha256`` is a release of ``app`` ``version``.

    Attributes
    ----------
    app, version : str
        The bundle's Flower app id (``publisher/name``) and version, for people.
    bundle_sha256 : str
        SHA-256 of the bundle's bytes, 64 lowercase hex digits: what the signature binds.
    signed_at : str
        When it was signed (UTC, ISO 8601).
    public_key : str
        The signer's public key as an OpenSSH line.
    signature : str
        Base64 Ed25519 signature over :meth:`signed_bytes`.

    """

    app: str
    version: str
    bundle_sha256: str
    signed_at: str
    public_key: str
    signature: str = ""
    format: str = FORMAT

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        fields = asdict(self)
        fields.pop("signature")
        return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @property
    def key_id(self) -> str:
        """Fingerprint of the key that signed (computed from the key, never trusted)."""
        return key_id(parse_public_key(self.public_key))

    def verifies_under(self, key: Ed25519PublicKey) -> bool:
        """Whether the signature is ``key``'s over this statement."""
        try:
            key.verify(base64.b64decode(self.signature, validate=True), self.signed_bytes())
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True

    def to_json(self) -> str:
        """The ``.sig`` file's text."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def to_token(self) -> str:
        """The run-config form: base64url of the compact JSON (no spaces, no quotes)."""
        compact = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(compact).decode().rstrip("=")


def sign_bundle(bundle: bytes, key: Ed25519PrivateKey, *, app: str, version: str,
                key_name: str = "") -> ReleaseStatement:
    """Sign ``bundle``'s SHA-256 with ``key``."""
    from medmeta_common.release.bundle import sha256_hex

    unsigned = ReleaseStatement(
        app=app, version=version, bundle_sha256=sha256_hex(bundle),
        signed_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        public_key=public_key_text(key.public_key(), key_name))
    signature = base64.b64encode(key.sign(unsigned.signed_bytes())).decode()
    return replace(unsigned, signature=signature)


def statement_from_mapping(data: Any) -> ReleaseStatement:
    """Rebuild a statement from parsed JSON; ``ValueError`` says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    names = {"app", "version", "bundle_sha256", "signed_at", "public_key", "signature",
             "format"}
    missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
    if missing or unknown:
        raise ValueError(f"missing fields {missing}" if missing else f"unknown fields {unknown}")
    if not all(isinstance(data[n], str) for n in names):
        raise ValueError("every field must be a string")
    if data["format"] != FORMAT:
        raise ValueError(f"format {data['format']!r} is not {FORMAT!r}")
    digest = data["bundle_sha256"]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("bundle_sha256 is not 64 lowercase hex digits")
    statement = ReleaseStatement(**data)
    parse_public_key(statement.public_key)  # raises ValueError on a bad key
    return statement


def statement_from_token(token: str) -> ReleaseStatement:
    """Decode the run-config form; ``ValueError`` says what is wrong."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ValueError("not base64url-encoded JSON") from None
    return statement_from_mapping(data)


def signature_path(bundle: Path) -> Path:
    """Where a bundle's ``.sig`` file lies (beside it)."""
    return bundle.with_name(bundle.name + SIG_SUFFIX)


def read_statement(path: Path) -> ReleaseStatement:
    """Read a ``.sig`` file."""
    try:
        return statement_from_mapping(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ReleaseError(f"{path}: no release signature here (make it with `medmeta release "
                           "sign`; it lies beside the .fab it signs)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{path}: not a release signature ({exc})") from None
