"""Learning curves and privacy spend per site, from the run's metrics log (PNG + CSV)."""

from __future__ import annotations

import csv
import functools
import io
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

from medmeta_common.checkpoint import atomic_write, atomic_write_text
from medmeta_common.figures import finished_png


def _series(records: list[dict[str, Any]], phase: str, key: str) -> dict[str, dict[int, float]]:
    """``site -> {round: value}`` of one metric."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for record in records:
        if record.get("phase") != phase:
            continue
        for site, metrics in record.get("sites", {}).items():
            if isinstance(metrics.get(key), (int, float)):
                series[site][int(record["round"])] = float(metrics[key])
    return dict(series)


def write_rounds_csv(records: list[dict[str, Any]], path: Path) -> None:
    """One row per round: accepted sites, mean validation accuracy, ε of each site."""
    accuracy = _series(records, "evaluate", "accuracy")
    epsilon = _series(records, "train", "epsilon")
    sites = sorted(set(accuracy) | set(epsilon))
    rounds = sorted({int(r["round"]) for r in records})
    accepted = {int(r["round"]): r.get("accepted") for r in records if r.get("phase") == "train"}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["round", "accepted_sites", "val_accuracy_mean",
                     *[f"val_accuracy[{s}]" for s in sites], *[f"epsilon[{s}]" for s in sites]])
    for r in rounds:
        accs = [accuracy[s][r] for s in sites if r in accuracy.get(s, {})]
        writer.writerow([r, accepted.get(r, ""),
                         f"{sum(accs) / len(accs):.4f}" if accs else "",
                         *[f"{accuracy[s][r]:.4f}" if r in accuracy.get(s, {}) else ""
                           for s in sites],
                         *[f"{epsilon[s][r]:.4f}" if r in epsilon.get(s, {}) else ""
                           for s in sites]])
    atomic_write_text(path, buffer.getvalue())


def write_plots(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``learning_curve.png`` and ``privacy_epsilon.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, phase, key, ylabel, title in (
        ("learning_curve.png", "evaluate", "accuracy", "few-shot accuracy (validation)",
         "Few-shot accuracy of the global encoder at each site"),
        ("privacy_epsilon.png", "train", "epsilon", "epsilon spent",
         "Privacy spent per site (record-level DP)"),
    ):
        series = _series(records, phase, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for site, values in sorted(series.items()):
            rounds = sorted(values)
            ax.plot(rounds, [values[r] for r in rounds], marker="o", label=site)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        png = finished_png(fig, ax)
        atomic_write(out_dir / name, functools.partial(_write_bytes, png))
        written.append(out_dir / name)
    return written


def _write_bytes(data: bytes, handle: IO[bytes]) -> None:
    handle.write(data)
