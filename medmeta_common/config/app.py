"""``app``: which code a hospital's site runs for the operator's runs (site.yaml).

The operator's SuperLink sends every site an app bundle with each run. The site's
policy decides, before anything from that bundle is imported (see
:mod:`client.app_policy`):

- ``source: installed`` (the default): run the medmeta installed at the site; the
  bundle's code is never imported, whatever it holds (NVIDIA FLARE's "no bring your
  own code"). The strictest policy, and it needs no keys.
- ``source: bundle`` with ``trusted_keys`` (Ed25519 public keys: an OpenSSH line
  ``ssh-ed25519 AAAA...`` or the path of a ``.pub`` file from ``medmeta release
  keygen``) and/or ``allowed_hashes`` (SHA-256 of the exact bundles allowed): run a
  bundle only when its hash is allowed, or when the run carries a release signature
  over exactly this bundle by one of the trusted keys.
- ``source: bundle`` with ``allow_unverified: true``: run whatever the operator sends
  (Flower's own behaviour). Explicit only, and warned about at every start.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from medmeta_common.config.typed import check
from medmeta_common.errors import ConfigError
from medmeta_common.release.keys import key_id, public_key_text, read_public_key

HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class AppPolicyConfig:
    """Which app code the site runs; see the module docstring.

    Attributes
    ----------
    source : {"installed", "bundle"}
        ``installed``: the site's own medmeta; ``bundle``: the run's bundle, if allowed.
    trusted_keys : tuple of str
        Release keys whose signature admits a bundle (``source: bundle``). After
        :func:`resolve_app_policy`, each is the key's OpenSSH line.
    allowed_hashes : tuple of str
        SHA-256 (64 hex digits) of bundles admitted as they are (``source: bundle``).
    allow_unverified : bool
        Run any bundle (``source: bundle``): checking off, warned at every start.

    """

    source: Literal["installed", "bundle"] = "installed"
    trusted_keys: tuple[str, ...] = ()
    allowed_hashes: tuple[str, ...] = ()
    allow_unverified: bool = False

    def __post_init__(self) -> None:
        vouchers = bool(self.trusted_keys or self.allowed_hashes)
        if self.source == "installed":
            for name in ("trusted_keys", "allowed_hashes", "allow_unverified"):
                check(not getattr(self, name), field=name,
                      expected="nothing with source: installed (the bundle's code is never "
                      "run; set source: bundle to run signed or pinned bundles)",
                      found=getattr(self, name))
        else:
            check(vouchers or self.allow_unverified, field="source",
                  expected="source: bundle with trusted_keys or allowed_hashes (or "
                  "allow_unverified: true to run any bundle, unchecked)",
                  found="source: bundle and neither")
            check(not (vouchers and self.allow_unverified), field="allow_unverified",
                  expected="false when trusted_keys or allowed_hashes are given (they would "
                  "check nothing)", found=self.allow_unverified)
        for i, digest in enumerate(self.allowed_hashes):
            check(len(digest) == 64 and set(digest.lower()) <= HEX,
                  field=f"allowed_hashes[{i}]", expected="a SHA-256 of 64 hex digits (as "
                  "`medmeta release sign` prints it)", found=digest)

    @property
    def checks_bundles(self) -> bool:
        """Whether a bundle must be vouched for before it runs."""
        return self.source == "bundle" and not self.allow_unverified


def resolve_app_policy(policy: AppPolicyConfig, base: Path, *, source: str) -> AppPolicyConfig:
    """Read every trusted key (inline, or a file relative to ``base``); normalise hashes.

    Errors name the file, ``app.trusted_keys[i]``, what was expected and what was found.
    """
    keys = []
    for i, entry in enumerate(policy.trusted_keys):
        try:
            key = read_public_key(entry, base)
        except ValueError as exc:
            raise ConfigError(source=source, field=f"app.trusted_keys[{i}]",
                              expected="an Ed25519 public key: an OpenSSH line 'ssh-ed25519 "
                              "AAAA...' or the path of a .pub file from `medmeta release "
                              "keygen`", found=f"{entry!r}: {exc}") from None
        keys.append(public_key_text(key, key_id(key)))
    ids = [k.split()[-1] for k in keys]
    if len(set(ids)) != len(ids):
        raise ConfigError(source=source, field="app.trusted_keys", expected="distinct keys",
                          found=f"the same key twice ({', '.join(ids)})")
    return replace(policy, trusted_keys=tuple(keys),
                   allowed_hashes=tuple(h.lower() for h in policy.allowed_hashes))
