"""App bundles (Flower FABs): build one, name it, read its metadata, stage it for a run.

Nothing here imports or runs code from a bundle: a bundle is bytes (a zip archive)
that is hashed, and at most has its ``pyproject.toml`` parsed as TOML or its files
written out. Bundles are built with Flower's own builder, which is deterministic (fixed
file dates, sorted paths), so a bundle staged from its own files rebuilds to the same
bytes; :func:`stage_bundle` checks that, because ``flwr run`` always rebuilds the app
it submits.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

from medmeta_common.release import ReleaseError

MANIFEST_DIR = ".info"  # Flower's per-file hash list inside a bundle


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data``, 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def build_bundle(app_dir: Path) -> bytes:
    """The bundle Flower builds from ``app_dir`` (its ``pyproject.toml`` and fab-include)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(Path(app_dir))
    except (ValueError, OSError) as exc:
        raise ReleaseError(f"{app_dir}: cannot build the app bundle ({exc})") from None


def read_bundle(path: Path) -> bytes:
    """A bundle's bytes, checked to be a zip archive with a ``pyproject.toml``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read the bundle ({exc.strerror or exc})") from None
    bundle_metadata(data, source=str(path))
    return data


def bundle_metadata(bundle: bytes, *, source: str = "the bundle") -> tuple[str, str]:
    """``(app id, version)`` from the bundle's ``pyproject.toml`` (parsed, never run)."""
    try:
        with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
            config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        app = f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}"
        return app, str(config["project"]["version"])
    except (zipfile.BadZipFile, KeyError, TypeError, UnicodeDecodeError,
            tomllib.TOMLDecodeError) as exc:
        raise ReleaseError(f"{source}: not a Flower app bundle ({type(exc).__name__}: {exc})"
                           ) from None


def bundle_filename(bundle: bytes) -> str:
    """Flower's file name for a bundle: ``<publisher>.<name>.<version>.<hash8>.fab``."""
    app, version = bundle_metadata(bundle)
    publisher, name = app.split("/", 1)
    return f"{publisher}.{name}.{version.replace('.', '-')}.{sha256_hex(bundle)[:8]}.fab"


def extract_files(bundle: bytes, dest: Path) -> Path:
    """Write the bundle's files (not Flower's manifest) into a new folder ``dest``."""
    if dest.exists():
        raise ReleaseError(f"{dest} exists; refusing to write a bundle over it")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
            for member in archive.infolist():
                path = PurePosixPath(member.filename)
                if member.is_dir() or path.parts[:1] == (MANIFEST_DIR,):
                    continue
                if path.is_absolute() or ".." in path.parts:
                    raise ReleaseError(f"unsafe path in the bundle: {member.filename}")
                target = tmp.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def stage_bundle(bundle: bytes, staging: Path) -> Path:
    """A folder ``flwr run`` rebuilds to exactly ``bundle`` (checked), under ``staging``.

    The folder is named by the bundle's full hash and reused when it already holds it.
    """
    digest = sha256_hex(bundle)
    folder = staging / digest
    if not folder.is_dir():
        extract_files(bundle, folder)
    rebuilt = build_bundle(folder)
    if rebuilt != bundle:
        raise ReleaseError(
            f"{folder}: Flower rebuilds this release to a different bundle (sha256 "
            f"{sha256_hex(rebuilt)}, not {digest}), so it cannot be submitted exactly as "
            "signed; delete the folder and retry, or sign the bundle this Flower builds")
    return folder
