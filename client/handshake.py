"""``site check``'s key checks: the key pair on disk, then an authenticated handshake.

A refused key used to surface only at ``site start``, behind Flower's "could not
establish a connection", with advice to register a key when the real problem was
another one. The checks here say which problem it is:

1. the private key cannot be read, or is not the kind Flower signs with;
2. the public key next to it (``<name>.pub``, the file the operator registered) is
   not its pair — the operator holds another key than the one in use;
3. the key pair was made for another site (``medmeta certs site`` writes the site's
   name into the public key): ``private_key`` points at the wrong site's key;
4. a SuperNode of this site already runs on this machine (it holds the connection);
5. the SuperLink's answer to a signed activation: accepted (the key is registered; the
   node is deactivated at once, so nothing is ever sent to it), refused (the key is
   not registered — or the node is already connected from elsewhere), or the
   signature rejected (this machine's clock is off).

The handshake uses Flower's own Fleet API client and signing (``flwr.supernode``),
exactly what ``flower-supernode`` sends, and pulls no message: no round can start.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medmeta_common.config.deploy import SiteDeployConfig
from medmeta_common.errors import FederationError

log = logging.getLogger("medmeta.site")

# How long the SuperLink may keep the probe's node "online" if the deactivation is lost.
PROBE_HEARTBEAT_SECONDS = 10.0


def check_key_pair(config: SiteDeployConfig) -> None:
    """Local checks 1-3 (see the module docstring); a clear error for each."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if config.insecure or config.private_key is None:
        return
    try:
        key = serialization.load_ssh_private_key(Path(config.private_key).read_bytes(),
                                                 password=None)
    except (OSError, ValueError) as exc:
        raise FederationError(f"{config.private_key}: not a readable OpenSSH private key "
                              f"({exc}); make one with `medmeta certs site`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FederationError(f"{config.private_key}: an ECDSA key is needed (medmeta certs "
                              "site makes one)")
    mine = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    public = Path(config.public_key or "")
    if not public.is_file():
        return
    fields = public.read_bytes().split()
    if b" ".join(fields[:2]) != mine:
        raise FederationError(
            f"{public} is not the public half of {config.private_key}: the key pair was "
            "made again, or the files come from different pairs. The operator registered "
            f"the key in {public.name}; send the operator the .pub of the key you use (and "
            "ask them to replace the old one), or point private_key at the matching key")
    made_for = fields[2].decode(errors="replace") if len(fields) > 2 else None
    if made_for is not None and made_for != config.name:
        raise FederationError(
            f"{config.private_key} is the key of site {made_for!r} (its public key says so), "
            f"but this site is {config.name!r}: the server would take this site for "
            f"{made_for}. Point private_key at {config.name}'s own key")


def running_supernode(config_path: Path) -> int | None:
    """The PID of a ``flower-supernode`` already started for this ``site.yaml``, if any."""
    marker = str(config_path.resolve()).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-supernode") for a in args) and \
                any(marker in a for a in args):
            return int(proc.name)
    return None


def handshake(config: SiteDeployConfig, config_path: Path) -> int | None:
    """Checks 4-5: the node id the SuperLink knows this key by (``None`` when insecure)."""
    if config.insecure or config.private_key is None:
        return None
    if (pid := running_supernode(config_path)) is not None:
        raise FederationError(
            f"site {config.name}'s SuperNode is already running on this machine (pid {pid}); "
            "it holds this key's connection, so the handshake cannot be made now (stop it "
            "to check, or read its log)")
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = load_ssh_private_key(Path(config.private_key).read_bytes(), password=None)
    public = key.public_key()
    client = FleetHttpClient.from_server_address(
        config.superlink, insecure=False, root_certificates=config.root_certificate,
        interceptors=[NodeAuthHttpInterceptor(key, public)])  # type: ignore[arg-type]
    try:
        reply = client.ActivateNode(ActivateNodeRequest(
            public_key=public_key_to_bytes(public),  # type: ignore[arg-type]
            heartbeat_interval=PROBE_HEARTBEAT_SECONDS))
    except httpx.HTTPStatusError as exc:
        raise FederationError(_refusal(config, exc.response.status_code,
                                       exc.response.text)) from None
    except httpx.HTTPError as exc:
        raise FederationError(f"the handshake with the SuperLink at {config.superlink} "
                              f"failed ({exc})") from None
    try:
        client.DeactivateNode(DeactivateNodeRequest(node_id=reply.node_id))
    except httpx.HTTPError as exc:  # it goes offline by itself after the heartbeat interval
        log.warning("the SuperLink accepted the key but the probe could not sign off (%s); "
                    "it shows offline within %.0f s", exc, PROBE_HEARTBEAT_SECONDS * 2)
    return int(reply.node_id)


def _refusal(config: SiteDeployConfig, status: int, body: str) -> str:
    if status == 401:
        return (f"the SuperLink at {config.superlink} rejected this site's signature: the "
                "clocks of this machine and the server must agree (within about a minute); "
                "check NTP on both")
    if "2004" in body or status == 412:
        return (f"the SuperLink at {config.superlink} does not accept site {config.name}'s key "
                f"({config.private_key}): either it is not registered — send "
                f"{config.public_key} to the operator, who lists it under sites: in "
                "server.yaml and restarts the server (a key pair made again needs its new "
                ".pub registered) — or a SuperNode with this key is already connected from "
                "another machine (keys are one per site)")
    return f"the SuperLink at {config.superlink} refused the handshake (HTTP {status}: {body})"
