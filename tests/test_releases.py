"""Release keys, signatures and the site's verdict on a bundle, with real Ed25519 keys.

The end-to-end promise (real SuperLink and SuperNodes) is in test_app_releases.py;
here each piece is checked on its own: keys are 0600 and never overwritten, their
fingerprints agree with ``ssh-keygen``, signatures verify with OpenSSL too, every
refusal reason is reached by the bundle or signature that should reach it, and
site.yaml's ``app`` section is validated field by field.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from client.app_policy import announce_policy, judge_bundle
from medmeta_common.config.app import AppPolicyConfig
from medmeta_common.config.deploy import load_site_config
from medmeta_common.errors import ConfigError
from medmeta_common.release import ReleaseError
from medmeta_common.release.bundle import build_bundle, sha256_hex, stage_bundle
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
    statement_from_token,
)

TINY_PYPROJECT = """[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
release-signature = ""
"""


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> bytes:
    app = tmp_path / "tinyapp-src"
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(TINY_PYPROJECT)
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "client.py").write_text("app = None  # a tiny app\n")
    return build_bundle(app)


@pytest.fixture
def release_key(tmp_path: Path):
    written = generate_release_key(tmp_path / "keys", name="consortium")
    return load_signing_key(written.secret[0]), written.public[0]


def policy_trusting(*pubs: Path, hashes: tuple[str, ...] = ()) -> AppPolicyConfig:
    keys = tuple(public_key_text(read_public_key(str(p))) for p in pubs)
    return AppPolicyConfig(source="bundle", trusted_keys=keys, allowed_hashes=hashes)


# --- keys -------------------------------------------------------------------------------


def test_release_key_is_private_and_never_overwritten(tmp_path: Path) -> None:
    written = generate_release_key(tmp_path, name="consortium")
    private, public = written.secret[0], written.public[0]
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    before = private.read_bytes()
    with pytest.raises(ReleaseError, match="never overwritten"):
        generate_release_key(tmp_path, name="consortium")
    assert private.read_bytes() == before
    public.unlink()  # even with one half gone, the other is not replaced
    with pytest.raises(ReleaseError, match="never overwritten"):
        generate_release_key(tmp_path, name="consortium")
    assert private.read_bytes() == before


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_key_fingerprint_is_the_one_ssh_keygen_prints(release_key) -> None:
    _, public = release_key
    printed = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True,
                             text=True, check=True).stdout.split()[1]
    assert key_id(read_public_key(str(public))) == printed


def test_encrypted_release_key_needs_its_passphrase(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    written = generate_release_key(tmp_path, name="locked", passphrase=b"correct horse")
    assert b"ENCRYPTED" in written.secret[0].read_bytes()
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    assert load_signing_key(written.secret[0]) is not None
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(ReleaseError, match="wrong passphrase"):
        load_signing_key(written.secret[0])


def test_a_release_key_readable_by_others_is_refused(release_key, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "consortium.key"
    key.chmod(0o644)
    with pytest.raises(ReleaseError, match="readable by other users"):
        load_signing_key(key)


# --- signatures -----------------------------------------------------------------------


def test_signature_round_trips_and_binds_every_field(tiny_bundle: bytes, release_key) -> None:
    key, _ = release_key
    statement = sign_bundle(tiny_bundle, key, app="test/tinyapp", version="1.0.0")
    assert statement.bundle_sha256 == sha256_hex(tiny_bundle)
    assert statement.verifies_under(key.public_key())
    assert statement_from_token(statement.to_token()) == statement
    for changed in (replace(statement, version="1.0.1"), replace(statement, app="x/y"),
                    replace(statement, signed_at="2020-01-01T00:00:00+00:00"),
                    replace(statement, bundle_sha256="0" * 64)):
        assert not changed.verifies_under(key.public_key())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_the_signature_independently(tiny_bundle: bytes, release_key,
                                                      tmp_path: Path) -> None:
    key, _ = release_key
    statement = sign_bundle(tiny_bundle, key, app="test/tinyapp", version="1.0.0")
    (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "msg").write_bytes(statement.signed_bytes())
    (tmp_path / "sig").write_bytes(base64.b64decode(statement.signature))
    command = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin",
               "-in", "msg", "-sigfile", "sig"]
    assert subprocess.run(command, cwd=tmp_path, capture_output=True).returncode == 0
    (tmp_path / "msg").write_bytes(statement.signed_bytes().replace(b"1.0.0", b"1.0.1"))
    assert subprocess.run(command, cwd=tmp_path, capture_output=True).returncode != 0


# --- the site's verdict ---------------------------------------------------------------


def test_a_signed_bundle_is_accepted_by_a_site_that_trusts_the_key(tiny_bundle: bytes,
                                                                   release_key) -> None:
    key, public = release_key
    token = sign_bundle(tiny_bundle, key, app="test/tinyapp", version="1.0.0").to_token()
    verdict = judge_bundle(policy_trusting(public), tiny_bundle, token)
    assert verdict.accepted and verdict.reason == "signed"
    assert key_id(key.public_key()) in verdict.detail


def test_one_byte_changed_in_the_bundle_is_a_bad_signature(tiny_bundle: bytes,
                                                           release_key) -> None:
    key, public = release_key
    token = sign_bundle(tiny_bundle, key, app="test/tinyapp", version="1.0.0").to_token()
    policy = policy_trusting(public)
    for position in (0, len(tiny_bundle) // 2, len(tiny_bundle) - 1):
        changed = bytearray(tiny_bundle)
        changed[position] ^= 0x01
        verdict = judge_bundle(policy, bytes(changed), token)
        assert not verdict.accepted and verdict.reason == "bad signature"
        assert "changed after it was signed" in verdict.detail
        assert sha256_hex(bytes(changed))[:16] in verdict.detail


def test_each_refusal_names_its_reason(tiny_bundle: bytes, release_key,
                                       tmp_path: Path) -> None:
    key, public = release_key
    other = load_signing_key(generate_release_key(tmp_path / "other", name="other").secret[0])
    statement = sign_bundle(tiny_bundle, key, app="test/tinyapp", version="1.0.0")
    policy = policy_trusting(public)
    unsigned = judge_bundle(policy, tiny_bundle, "")
    assert (unsigned.accepted, unsigned.reason) == (False, "unsigned")
    by_other = sign_bundle(tiny_bundle, other, app="test/tinyapp", version="1.0.0").to_token()
    unknown = judge_bundle(policy, tiny_bundle, by_other)
    assert (unknown.accepted, unknown.reason) == (False, "unknown key")
    assert key_id(other.public_key()) in unknown.detail
    # The attacker relabels the genuine statement with the tampered bundle's hash.
    tampered = tiny_bundle + b"\0"
    relabelled = replace(statement, bundle_sha256=sha256_hex(tampered)).to_token()
    forged = judge_bundle(policy, tampered, relabelled)
    assert (forged.accepted, forged.reason) == (False, "bad signature")
    assert "does not verify" in forged.detail
    # A trusted key's line with someone else's signature bytes.
    wrong_bytes = replace(statement, signature=base64.b64encode(b"\1" * 64).decode())
    assert judge_bundle(policy, tiny_bundle, wrong_bytes.to_token()).reason == "bad signature"
    malformed = judge_bundle(policy, tiny_bundle, "not-a-token")
    assert (malformed.reason, "malformed" in malformed.detail) == ("bad signature", True)


def test_every_refusal_reaches_the_server_whole(tiny_bundle: bytes, release_key,
                                               tmp_path: Path) -> None:
    """The server keeps the first 300 characters of a site's error: the reasons fit."""
    from client.app_runner import refusal_reason

    key, public = release_key
    others = [generate_release_key(tmp_path / f"k{i}", name=f"k{i}").public[0]
              for i in range(4)]
    strict = policy_trusting(public, *others, hashes=("a" * 64,))
    statement = sign_bundle(tiny_bundle, key, app="test/tinyapp", version="1.0.0")
    stranger = load_signing_key(generate_release_key(tmp_path / "s", name="s").secret[0])
    cases = [
        judge_bundle(strict, tiny_bundle, ""),
        judge_bundle(strict, tiny_bundle + b"\0", statement.to_token()),
        judge_bundle(strict, tiny_bundle, sign_bundle(tiny_bundle, stranger, app="test/tinyapp",
                                                      version="1.0.0").to_token()),
        judge_bundle(strict, tiny_bundle, "garbage"),
        judge_bundle(AppPolicyConfig(source="bundle", allowed_hashes=("a" * 64,)), tiny_bundle,
                     ""),
    ]
    assert {c.reason for c in cases} == {"unsigned", "bad signature", "unknown key",
                                         "hash not allowed"}
    for verdict in cases:
        reason = refusal_reason("university-hospital-of-somewhere-long", verdict, tiny_bundle)
        assert len(reason) <= 300, reason
        assert reason.endswith("nothing from it ran")


def test_allowed_hashes_pin_exact_bundles(tiny_bundle: bytes, release_key) -> None:
    _, public = release_key
    pinned = AppPolicyConfig(source="bundle", allowed_hashes=(sha256_hex(tiny_bundle),))
    assert judge_bundle(pinned, tiny_bundle, "").reason == "allowed hash"
    other = judge_bundle(pinned, tiny_bundle + b"\0", "")
    assert (other.accepted, other.reason) == (False, "hash not allowed")
    # Keys and hashes together: either vouches; a refusal says both were tried.
    both = policy_trusting(public, hashes=(sha256_hex(tiny_bundle),))
    assert judge_bundle(both, tiny_bundle, "").accepted
    refused = judge_bundle(both, tiny_bundle + b"\0", "")
    assert refused.reason == "unsigned" and "not pinned" in refused.detail


def test_checking_off_is_explicit_and_warned(tiny_bundle: bytes,
                                             caplog: pytest.LogCaptureFixture) -> None:
    policy = AppPolicyConfig(source="bundle", allow_unverified=True)
    assert judge_bundle(policy, tiny_bundle, "").reason == "unverified"
    with caplog.at_level("WARNING", logger="medmeta.site"):
        announce_policy("hospital-a", policy)
    assert "ANY app bundle" in caplog.text and "unverified" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="medmeta.site"):
        announce_policy("hospital-a", AppPolicyConfig())
    assert caplog.text == ""


# --- site.yaml's app section ----------------------------------------------------------


def write_site(tmp_path: Path, app: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"""kind: site
name: hospital-a
data: {{path: builtin:demo/site-0}}
state_dir: state
insecure: true
{app}
""")
    return path


def test_the_default_runs_only_the_installed_code(tmp_path: Path) -> None:
    assert load_site_config(write_site(tmp_path, "")).app == AppPolicyConfig(source="installed")


def test_trusted_keys_are_read_from_files_next_to_site_yaml(tmp_path: Path, release_key) -> None:
    other = generate_release_key(tmp_path / "other", name="other").public[0]
    inline = other.read_text().strip()
    config = load_site_config(write_site(
        tmp_path, f"app: {{source: bundle, trusted_keys: [keys/consortium.pub, '{inline}']"
        f", allowed_hashes: ['{'AB' * 32}']}}"))
    assert len(config.app.trusted_keys) == 2 and config.app.trusted_keys[0].startswith(
        "ssh-ed25519 ")
    assert config.app.allowed_hashes == ("ab" * 32,)  # normalised to lower case
    same = f"app: {{source: bundle, trusted_keys: [keys/consortium.pub, '{inline}', " \
        f"other/other.pub]}}"
    with pytest.raises(ConfigError, match="the same key twice"):
        load_site_config(write_site(tmp_path, same))


@pytest.mark.parametrize(("app", "field", "says"), [
    ("app: {trusted_keys: [k.pub]}", "app.trusted_keys", "source: installed"),
    ("app: {source: bundle}", "app.source", "trusted_keys or allowed_hashes"),
    ("app: {source: bundle, allowed_hashes: [abc]}", "app.allowed_hashes[0]", "64 hex"),
    ("app: {source: bundle, trusted_keys: [missing.pub]}", "app.trusted_keys[0]",
     "missing.pub"),
    ("app: {source: bundle, trusted_keys: ['ssh-rsa AAAA x']}", "app.trusted_keys[0]",
     "ssh-ed25519"),
    ("app: {source: bundle, allowed_hashes: ['" + "a" * 64 + "'], allow_unverified: true}",
     "app.allow_unverified", "false"),
    ("app: {sorce: bundle}", "app.sorce", "did you mean 'source'"),
    ("app: {source: bundel}", "app.source", "did you mean 'bundle'"),
])
def test_bad_app_policies_name_the_field(tmp_path: Path, app: str, field: str,
                                         says: str) -> None:
    path = write_site(tmp_path, app)
    with pytest.raises(ConfigError) as error:
        load_site_config(path)
    assert error.value.field == field and error.value.source == str(path)
    assert says in str(error.value)


# --- the operator's side --------------------------------------------------------------


def test_a_staged_release_rebuilds_to_exactly_the_signed_bundle(tiny_bundle: bytes,
                                                                tmp_path: Path) -> None:
    folder = stage_bundle(tiny_bundle, tmp_path / "staging")
    assert build_bundle(folder) == tiny_bundle
    (folder / "tinyapp" / "client.py").write_text("app = 'changed'\n")
    with pytest.raises(ReleaseError, match="rebuilds this release to a different bundle"):
        stage_bundle(tiny_bundle, tmp_path / "staging")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medmeta.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120, check=False)


@pytest.mark.slow
def test_release_commands_sign_verify_and_refuse(tiny_bundle: bytes, tmp_path: Path) -> None:
    (tmp_path / "tiny.fab").write_bytes(tiny_bundle)
    for name in ("consortium", "stranger"):
        assert run_cli("release", "keygen", "--out", "keys", "--name", name,
                       cwd=tmp_path).returncode == 0
    signed = run_cli("release", "sign", "--key", "keys/consortium.key", "--bundle", "tiny.fab",
                     "--out", "releases", "--json", cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    release = json.loads(signed.stdout)
    assert release["sha256"] == sha256_hex(tiny_bundle)
    bundle = Path(release["bundle"])
    assert bundle.parent == tmp_path / "releases"
    assert bundle.read_bytes() == tiny_bundle
    assert read_statement(signature_path(bundle)).bundle_sha256 == release["sha256"]
    again = run_cli("release", "sign", "--key", "keys/consortium.key", "--bundle", "tiny.fab",
                    "--out", "releases", cwd=tmp_path)
    assert again.returncode == 8 and "already signed" in again.stderr
    ok = run_cli("release", "verify", "--bundle", str(bundle), "--trusted-key",
                 "keys/consortium.pub", cwd=tmp_path)
    assert ok.returncode == 0 and "signed by SHA256:" in ok.stdout
    stranger = run_cli("release", "verify", "--bundle", str(bundle), "--trusted-key",
                       "keys/stranger.pub", cwd=tmp_path)
    assert stranger.returncode == 8 and "unknown key" in stranger.stderr
    bundle.write_bytes(tiny_bundle + b"\0")
    changed = run_cli("release", "verify", "--bundle", str(bundle), "--trusted-key",
                      "keys/consortium.pub", cwd=tmp_path)
    assert changed.returncode == 8 and "bad signature" in changed.stderr
