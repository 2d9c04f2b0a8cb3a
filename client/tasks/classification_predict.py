"""Classification predictions of an adapted model for image files; a bad file is reported.

A file that cannot be decoded gets an error row naming the reason, never a crash.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.tasks.classification_adapt import AdaptedModel, load_adapted
from medmeta_common.checkpoint import atomic_write_text
from medmeta_common.data.images import input_files, read_image_file
from medmeta_common.data.transforms import harmonise_stack
from medmeta_common.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One file's predicted class and probabilities, or why it could not be read."""

    file: str
    label: str | None
    probabilities: tuple[float, ...] | None
    error: str | None = None


@torch.no_grad()
def predict(model: AdaptedModel, paths: list[Path], *, root: Path | None = None,
            batch_size: int = 256) -> list[Prediction]:
    """Predict every file; files that cannot be decoded get an error instead."""
    results: list[Prediction] = []
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        images = np.concatenate([img for _, img in pending])
        logits = model.head(model.encoder(torch.from_numpy(images)))
        probs = torch.softmax(logits, dim=1).numpy()
        for (name, _), p in zip(pending, probs, strict=True):
            results.append(Prediction(name, model.classes[int(p.argmax())],
                                      tuple(float(x) for x in p)))
        pending.clear()

    model.encoder.eval()
    for path in paths:
        name = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        try:
            decoded = read_image_file(path, frames="middle", display_name=name)
        except DataError as exc:
            log.warning("cannot predict %s: %s", name, exc.reason)
            results.append(Prediction(name, None, None, exc.reason))
            continue
        image = harmonise_stack(decoded.frames[:1], size=model.image.size,
                                channels=model.image.channels, intensity=model.image.intensity)
        pending.append((name, image))
        if len(pending) >= batch_size:
            flush()
    flush()
    order = {name: i for i, name in enumerate(
        str(p.relative_to(root)) if root and p.is_relative_to(root) else str(p) for p in paths)}
    return sorted(results, key=lambda r: order[r.file])


def predictions_csv(predictions: list[Prediction], classes: tuple[str, ...]) -> str:
    """CSV text: ``file,prediction,p_<class>...,error``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "prediction", *[f"p_{c}" for c in classes], "error"])
    for p in predictions:
        probs = [f"{x:.6f}" for x in p.probabilities] if p.probabilities else [""] * len(classes)
        writer.writerow([p.file, p.label or "", *probs, p.error or ""])
    return buffer.getvalue()


def write_predictions(predictions: list[Prediction], classes: tuple[str, ...], out: Path) -> None:
    """Write the CSV atomically."""
    atomic_write_text(out, predictions_csv(predictions, classes))


def predict_command(folder: Path, inputs: Path, out: Path | None) -> int:
    """``medmeta predict`` with a saved classifier: CSV to ``out`` (or stdout)."""
    model = load_adapted(folder)
    root = inputs if inputs.is_dir() else inputs.parent
    predictions = predict(model, input_files(inputs), root=root)
    if out is None:
        sys.stdout.write(predictions_csv(predictions, model.classes))
    else:
        write_predictions(predictions, model.classes, out)
    failed = sum(p.error is not None for p in predictions)
    log.info("%d file(s) predicted, %d could not be read%s", len(predictions) - failed, failed,
             f"; written to {out}" if out else "")
    return failed
