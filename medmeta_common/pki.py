"""The consortium's certificates and keys (``medmeta certs ...``), made with ``cryptography``.

- a consortium CA (EC P-384, self-signed) that every site trusts;
- a SuperLink TLS certificate signed by it, with the server's names and addresses as
  subject alternative names;
- one ECDSA P-384 key pair per site in OpenSSH format, the format Flower's SuperNode
  authentication expects (the operator registers the public key).

Private keys are written with mode 0600 and never overwritten unless asked to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medmeta_common.errors import MedmetaError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


class PKIError(MedmetaError):
    """A certificate or key could not be made, read or written."""

    exit_code = 7


@dataclass(frozen=True)
class Written:
    """Files a ``certs`` command wrote: what to keep secret, what to hand out."""

    secret: tuple[Path, ...]
    public: tuple[Path, ...]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, *, secret: bool, force: bool) -> Path:
    """Write ``data``; secrets get mode 0600; refuse to replace a file unless ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise PKIError(f"{path} exists; refusing to overwrite it (use --force to replace it, "
                       "and remember that everything signed with or trusting it must be redone)")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    return path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(out: Path, *, name: str, days: int = 3650, force: bool = False) -> Written:
    """Create the consortium CA (``ca.key`` stays with the operator, ``ca.crt`` goes to sites)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} medmeta CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    secret = _write(out / CA_KEY, _private_pem(key), secret=True, force=force)
    public = _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), secret=False,
                    force=force)
    return Written((secret,), (public,))


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PKIError(f"{exc.filename}: no consortium CA here; run `medmeta certs init --out "
                       f"{out}` first") from None
    except ValueError as exc:
        raise PKIError(f"{out}: the CA certificate or key cannot be read ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{out / CA_KEY}: expected an EC private key")
    return cert, key


def server_certificate(out: Path, *, hosts: list[str], days: int = 825,
                       force: bool = False) -> Written:
    """A SuperLink certificate for ``hosts`` (names and IP addresses), signed by the CA."""
    if not hosts:
        raise PKIError("give at least one --host (a DNS name or IP address the sites will use)")
    ca_cert, ca_key = _load_ca(out)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    secret = _write(out / SERVER_KEY, _private_pem(key), secret=True, force=force)
    public = _write(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM),
                    secret=False, force=force)
    return Written((secret,), (public,))


def site_keypair(out: Path, *, name: str, force: bool = False) -> Written:
    """A site's SuperNode authentication key pair (OpenSSH ECDSA P-384)."""
    if not name or "/" in name or name.startswith("."):
        raise PKIError(f"invalid site name {name!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    secret = _write(out / f"{name}.key", private, secret=True, force=force)
    shared = _write(out / f"{name}.pub", public + f" {name}\n".encode(), secret=False,
                    force=force)
    return Written((secret,), (shared,))
