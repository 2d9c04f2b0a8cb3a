"""A small Python API for notebooks, mirroring the CLI and the few-shot papers' flow.

>>> import medmeta
>>> meta = medmeta.load("runs/demo")                      # the federation's meta-model
>>> meta.evaluate(data="site.npz", ways=3, shots=5)        # episodic few-shot accuracy
>>> clf = meta.adapt(task="classification", data="site.npz", split="train", shots=5)
>>> clf.evaluate(data="site.npz", split="test")            # accuracy of the adapted model
>>> clf.predict(["scan1.dcm", "folder/"])                  # class probabilities
>>> clf.save("models/site-a")                               # for `medmeta predict`

Everything runs locally; nothing leaves the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.fewshot import FewShotResult, evaluate_fewshot
from client.meta_model import MetaModel, load_meta_model
from client.tasks.classification import ClassificationTask
from client.tasks.classification_adapt import AdaptedModel, adapt, load_adapted, save_adapted
from client.tasks.classification_predict import Prediction, predict
from medmeta_common.config import DataConfig, FewShotConfig
from medmeta_common.config.typed import build
from medmeta_common.data.images import input_files
from medmeta_common.data.records import SiteData
from medmeta_common.data.sources import load_site
from medmeta_common.data.transforms import harmonise_stack

PathLike = str | Path


def _data_config(data: PathLike, split: str | None) -> DataConfig:
    path = str(data)
    if not path.startswith("builtin:"):
        path = str(Path(path).expanduser().resolve())
    return build(DataConfig, {"path": path, "split": split}, source="medmeta API")


def _k_per_class(site: SiteData, shots: int, seed: int) -> SiteData:
    """``shots`` random images of every class that has that many."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(site.labels == c), size=shots, replace=False)
              for c in range(len(site.classes)) if (site.labels == c).sum() >= shots]
    if not chosen:
        raise ValueError(f"no class has {shots} labelled images")
    return site.subset(np.sort(np.concatenate(chosen)))


@dataclass
class Classifier:
    """A site's adapted classifier (see :meth:`MetaLearner.adapt`)."""

    model: AdaptedModel

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in the order of the probabilities."""
        return self.model.classes

    def predict(self, inputs: PathLike | list[PathLike] | np.ndarray) -> list[Prediction]:
        """Predictions for files, folders, or an ``(N, H, W)`` / ``(N, C, H, W)`` array."""
        if isinstance(inputs, np.ndarray):
            return self._predict_array(inputs)
        paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        files = [f for p in paths for f in input_files(Path(p))]
        return predict(self.model, files)

    @torch.no_grad()
    def _predict_array(self, array: np.ndarray) -> list[Prediction]:
        stack = array[:, None] if array.ndim == 3 else array
        image = self.model.image
        images = harmonise_stack(stack, size=image.size, channels=image.channels,
                                 intensity=image.intensity)
        probs = torch.softmax(self.model.head(self.model.encoder(torch.from_numpy(images))), 1)
        return [Prediction(f"array[{i}]", self.classes[int(p.argmax())],
                           tuple(float(x) for x in p)) for i, p in enumerate(probs.numpy())]

    def evaluate(self, data: PathLike, split: str | None = None) -> dict[str, Any]:
        """Accuracy on labelled data whose class names match the adapted classes."""
        site = load_site(_data_config(data, split), self.model.image)
        known = [i for i, c in enumerate(site.classes) if c in self.classes]
        keep = np.flatnonzero(np.isin(site.labels, known))
        if not len(keep):
            raise ValueError(f"none of the classes {list(site.classes)} is one of "
                             f"{list(self.classes)}")
        truth = np.array([self.classes.index(site.classes[i]) for i in site.labels[keep]])
        with torch.no_grad():
            logits = self.model.head(self.model.encoder(torch.from_numpy(site.images[keep])))
        predicted = logits.argmax(1).numpy()
        return {"accuracy": float((predicted == truth).mean()), "images": len(keep)}

    def save(self, folder: PathLike) -> Path:
        """Write the model for ``medmeta predict --model``."""
        return save_adapted(self.model, Path(folder))


@dataclass
class MetaLearner:
    """The federation's meta-model, ready to adapt at a site."""

    meta: MetaModel

    def evaluate(self, data: PathLike, *, ways: int, shots: int, queries: int = 15,
                 episodes: int = 200, split: str | None = None, finetune_steps: int = 0,
                 seed: int = 0) -> FewShotResult:
        """N-way K-shot accuracy over seeded episodes (as ``medmeta adapt``)."""
        fewshot = build(FewShotConfig, {"ways": ways, "shots": shots, "queries": queries,
                                        "episodes": episodes, "finetune_steps": finetune_steps},
                        source="medmeta API")
        site = load_site(_data_config(data, split), self.meta.image)
        return evaluate_fewshot(self.meta.encoder, site.images, site.labels, len(site.classes),
                                fewshot, seed=seed, device=torch.device("cpu"),
                                scale=self.meta.model.cosine_scale)

    def adapt(self, *, task: str = "classification", data: PathLike, shots: int | None = None,
              split: str | None = None, finetune_steps: int | None = None,
              finetune: str | None = None, seed: int = 0) -> Classifier:
        """Adapt to the site's task from ``shots`` labelled images per class (all if None).

        Unset fine-tuning settings take ``medmeta adapt``'s defaults (20 FiLM steps).
        """
        if task != "classification":
            raise ValueError(f"task {task!r} is not supported yet; use 'classification'")
        site = load_site(_data_config(data, split), self.meta.image)
        if shots is not None:
            site = _k_per_class(site, shots, seed)
        defaults = ClassificationTask.adapt_defaults.for_backbone(self.meta.model.backbone)
        steps = defaults.finetune_steps if finetune_steps is None else finetune_steps
        return Classifier(adapt(self.meta, site, finetune_steps=steps,
                                finetune=finetune or defaults.finetune))  # type: ignore[arg-type]


def load(path: PathLike) -> MetaLearner:
    """The meta-model of a run directory or checkpoint file."""
    return MetaLearner(load_meta_model(Path(path)))


def load_classifier(folder: PathLike) -> Classifier:
    """A classifier saved with :meth:`Classifier.save` or ``medmeta adapt --save``."""
    return Classifier(load_adapted(Path(folder)))
