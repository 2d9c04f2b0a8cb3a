"""Configuration of a production deployment: the operator's server and each hospital's site.

``kind: server`` (the operator) holds the method (the same fields as a simulated
federation: rounds, image, model, train, server, evaluation), where the SuperLink
listens, the consortium's certificates, the state directory, and the sites' public
keys. ``kind: site`` (a hospital) holds the site's data, its privacy budget, its state
directory, the SuperLink address, the consortium CA, the site's private key, and which
app code it runs (``app``, :mod:`medmeta_common.config.app`). The server's optional
``release`` names a signed app bundle (``medmeta release sign``) to submit exactly.
Relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from medmeta_common.config.app import AppPolicyConfig, resolve_app_policy
from medmeta_common.config.data import DataConfig, resolve_path, with_resolved_path
from medmeta_common.config.federation import (
    FederationConfig,
    MethodConfig,
    RuntimeConfig,
    load_config,
    with_resolved_weights,
)
from medmeta_common.config.privacy import PrivacyConfig
from medmeta_common.config.tasks import DEFAULT_TILE, TaskName, check_task_fields
from medmeta_common.config.typed import build, check, load_yaml_mapping
from medmeta_common.errors import ConfigError


@dataclass(frozen=True)
class SuperLinkConfig:
    """Where the SuperLink listens and how it secures connections.

    Attributes
    ----------
    host, port : str, int
        Address of the SuperLink's HTTP API (Fleet API for sites, Control API for the
        operator's tools).
    certificates : str, optional
        The consortium PKI folder (``medmeta certs``): ``ca.crt``, ``server.pem``,
        ``server.key``. Required unless ``insecure``.
    insecure : bool
        No TLS and no SuperNode authentication. For tests on one machine only; warned
        about at every start.

    """

    host: str = "0.0.0.0"
    port: int = 8000
    certificates: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, field="port", expected="a TCP port", found=self.port)
        check(self.insecure or self.certificates is not None, field="certificates",
              expected="the consortium PKI folder (ca.crt, server.pem, server.key), or "
              "insecure: true", found=None)


@dataclass(frozen=True)
class RegisteredSite:
    """A hospital allowed to join: its name and its SuperNode public key file."""

    name: str
    public_key: str


@dataclass(frozen=True, kw_only=True)
class ServerConfig(MethodConfig):
    """The operator's ``server.yaml``.

    ``release`` is the path of a signed app bundle (``.fab``, its ``.sig`` beside it)
    that ``server start`` submits exactly, with its signature; without it the app is
    built from the installed source and submitted unsigned. It is not part of the
    method: a resumed run may change it.
    """

    kind: Literal["server"]
    state_dir: str
    sites: tuple[RegisteredSite, ...] = ()
    superlink: SuperLinkConfig = field(default_factory=SuperLinkConfig)
    release: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [s.name for s in self.sites]
        check(len(set(names)) == len(names), field="sites", expected="distinct site names",
              found=names)


@dataclass(frozen=True)
class SiteDeployConfig:
    """A hospital's ``site.yaml``."""

    kind: Literal["site"]
    name: str
    data: DataConfig
    state_dir: str
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    val_fraction: float = 0.2
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    superlink: str = "127.0.0.1:8000"
    root_certificate: str | None = None
    private_key: str | None = None
    insecure: bool = False
    port: int = 9094
    cache_data: bool = True
    task: TaskName = "classification"
    tile: int = DEFAULT_TILE
    # Folders where the site keeps file priors (found by their SHA-256; the state
    # directory's ``priors/`` is searched too).
    priors: tuple[str, ...] = ()
    app: AppPolicyConfig = field(default_factory=AppPolicyConfig)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, field="name",
              expected="a site name without '/'", found=self.name)
        check(":" in self.superlink, field="superlink", expected="HOST:PORT",
              found=self.superlink)
        check_task_fields(self.task, self.data, self.tile)
        check(self.insecure or self.root_certificate is not None, field="root_certificate",
              expected="the consortium CA certificate (ca.crt), or insecure: true", found=None)
        check(self.insecure or self.private_key is not None, field="private_key",
              expected="this site's private key (medmeta certs site), or insecure: true",
              found=None)
        check(0 < self.port < 65536, field="port", expected="a TCP port", found=self.port)

    @property
    def public_key(self) -> str | None:
        """The public key next to the private key (``<name>.pub``)."""
        if self.private_key is None:
            return None
        return str(Path(self.private_key).with_suffix(".pub"))


def _resolve(base: Path, value: str | None) -> str | None:
    return None if value is None else resolve_path(base, value)


def load_server_config(path: Path | str) -> ServerConfig:
    """Load and validate ``server.yaml``."""
    path = Path(path)
    config = build(ServerConfig, load_yaml_mapping(path), source=str(path))
    base = path.resolve().parent
    return replace(
        config,
        model=with_resolved_weights(config.model, base),
        state_dir=resolve_path(base, config.state_dir),
        sites=tuple(replace(s, public_key=resolve_path(base, s.public_key))
                    for s in config.sites),
        superlink=replace(config.superlink,
                          certificates=_resolve(base, config.superlink.certificates)),
        release=_resolve(base, config.release),
    )


def load_site_config(path: Path | str) -> SiteDeployConfig:
    """Load and validate ``site.yaml``."""
    path = Path(path)
    config = build(SiteDeployConfig, load_yaml_mapping(path), source=str(path))
    base = path.resolve().parent
    return replace(config, data=with_resolved_path(config.data, base),
                   state_dir=resolve_path(base, config.state_dir),
                   root_certificate=_resolve(base, config.root_certificate),
                   priors=tuple(resolve_path(base, p) for p in config.priors),
                   private_key=_resolve(base, config.private_key),
                   app=resolve_app_policy(config.app, base, source=str(path)))


def load_any_config(path: Path | str) -> FederationConfig | ServerConfig | SiteDeployConfig:
    """Load a config of any kind (``federation``, ``server`` or ``site``)."""
    raw: dict[str, Any] = load_yaml_mapping(Path(path))
    kind = raw.get("kind", "federation")
    if kind == "server":
        return load_server_config(path)
    if kind == "site":
        return load_site_config(path)
    if kind == "federation":
        return load_config(path)
    raise ConfigError(source=str(path), field="kind",
                      expected="'federation', 'server' or 'site'", found=repr(kind))
