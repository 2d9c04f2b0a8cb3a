"""The consortium's release key: Ed25519, made and read with ``cryptography``.

The private half (``<name>.key``, PKCS#8 PEM, optionally encrypted with a passphrase)
signs releases and is created with mode 0600; it is never overwritten, not even on
request: a site that trusts a key trusts everything it ever signed, so replacing one
is a decision to make by hand (move the old file away, tell every site). The public
half (``<name>.pub``) is one OpenSSH line, ``ssh-ed25519 AAAA... <name>``, the form
hospitals list under ``app.trusted_keys`` (and the form Flower's own
``--trusted-entities`` uses). A key is named by its OpenSSH fingerprint,
``SHA256:<base64>``, as ``ssh-keygen -l`` prints it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import getpass
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medmeta_common.pki import Written
from medmeta_common.release import ReleaseError

# Non-interactive signing (a release pipeline) reads the passphrase from here.
PASSPHRASE_ENV = "MEDMETA_RELEASE_PASSPHRASE"
KEY_TYPE = "ssh-ed25519"


def _write_new(path: Path, data: bytes, *, mode: int) -> Path:
    """Write ``path`` atomically with ``mode``; fail if it exists (never overwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # link() refuses an existing target: a key can never replace another.
        os.link(tmp, path)
    except FileExistsError:
        raise ReleaseError(f"{path} exists; a release key is never overwritten (move it away "
                           "yourself if you mean to replace it, and tell every site that "
                           "trusts it)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def generate_release_key(out: Path, *, name: str, passphrase: bytes | None = None) -> Written:
    """Make ``<out>/<name>.key`` (0600) and ``<out>/<name>.pub``; refuse existing files."""
    if not name or "/" in name or name.startswith(".") or any(c.isspace() for c in name):
        raise ReleaseError(f"invalid release key name {name!r} (letters, digits, '-', '_')")
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ReleaseError(f"{path} exists; a release key is never overwritten (move it "
                               "away yourself if you mean to replace it, and tell every site "
                               "that trusts it)")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                encryption)
    secret = _write_new(private_path, private, mode=0o600)
    public = _write_new(public_path, (public_key_text(key.public_key(), name) + "\n").encode(),
                        mode=0o644)
    return Written((secret,), (public,))


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read a release private key; ask for its passphrase if it is encrypted."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read the release key ({exc.strerror or exc})"
                           ) from None
    if Path(path).stat().st_mode & 0o077:
        raise ReleaseError(f"{path}: the release key is readable by other users; `chmod 600` "
                           "it (and consider whether it has leaked)")
    password = None
    if b"ENCRYPTED" in data:
        env = os.environ.get(PASSPHRASE_ENV)
        password = env.encode() if env else getpass.getpass(f"passphrase for {path}: ").encode()
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ReleaseError(f"{path}: not a readable release key, or a wrong passphrase ({exc})"
                           ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: expected an Ed25519 key (from `medmeta release keygen`), "
                           f"found a {type(key).__name__}")
    return key


def public_key_text(key: Ed25519PublicKey, comment: str = "") -> str:
    """The OpenSSH line of a public key (``ssh-ed25519 AAAA... comment``)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its OpenSSH line; ``ValueError`` says what is wrong."""
    fields = text.strip().split()
    if len(fields) < 2 or fields[0] != KEY_TYPE:
        raise ValueError(f"expected an OpenSSH line starting with '{KEY_TYPE} '")
    try:
        key = serialization.load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (ValueError, UnsupportedAlgorithm, binascii.Error) as exc:
        raise ValueError(f"not a readable {KEY_TYPE} key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"expected an Ed25519 key, found a {type(key).__name__}")
    return key


def read_public_key(source: str, base: Path | None = None) -> Ed25519PublicKey:
    """A key given inline (``ssh-ed25519 ...``) or as the path of a ``.pub`` file."""
    if source.strip().startswith(KEY_TYPE + " "):
        return parse_public_key(source)
    path = Path(source) if base is None or Path(source).is_absolute() else base / source
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the key file {path} ({getattr(exc, 'strerror', exc)})"
                         ) from None
    with contextlib.suppress(IndexError):
        text = text.strip().splitlines()[0]
    return parse_public_key(text)


def key_id(key: Ed25519PublicKey) -> str:
    """The key's OpenSSH fingerprint, ``SHA256:<unpadded base64>`` (as ``ssh-keygen -l``)."""
    blob = base64.b64decode(public_key_text(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def raw_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 bytes of the key: two keys are the same key exactly when these match."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
