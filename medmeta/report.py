"""``report.md`` of a simulated run: what ran, how it learned, what it cost, what it gives."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.fewshot import FewShotResult
from medmeta_common.checkpoint import atomic_write_text
from medmeta_common.config import FederationConfig
from medmeta_common.privacy.accounting import CONVERSIONS
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger


def _pct(result: FewShotResult) -> str:
    return f"{100 * result.accuracy_mean:.1f}% ± {100 * result.accuracy_ci95:.1f}"


def write_report(out_dir: Path, config: FederationConfig, records: list[dict[str, Any]],
                 held_out: FewShotResult | None, untrained: FewShotResult | None) -> Path:
    """Write ``out_dir/report.md`` and return its path."""
    lines = [
        f"# medmeta run: {config.name}",
        "",
        f"{config.description}".strip() or "(no description)",
        "",
        f"- written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, config hash "
        f"`{config.hash()}`",
        f"- {len(config.sites)} site(s), {config.rounds} round(s) of "
        f"{config.train.local_steps} local step(s); loss `{config.train.loss}`; meta-update "
        f"`{config.server.optimizer}` with meta-lr {config.server.meta_lr}",
        f"- encoder `{config.model.backbone}` (weights `{config.model.weights}`, trainable "
        f"`{config.train.trainable}`), images {config.image.size}x{config.image.size}, "
        f"{config.image.channels} channel(s)",
        "",
        "## Few-shot validation accuracy at the training sites",
        "",
        "![learning curve](learning_curve.png)",
        "",
    ]
    evaluations = [r for r in records if r.get("phase") == "evaluate"]
    if evaluations:
        last = evaluations[-1]
        lines += ["| site | accuracy (last round) | ways |", "|---|---|---|"]
        for site, m in sorted(last["sites"].items()):
            if "accuracy" in m:
                lines.append(f"| {site} | {100 * m['accuracy']:.1f}% ± "
                             f"{100 * m.get('accuracy-ci95', 0):.1f} | {m.get('ways', '')} |")
        lines.append("")
    lines += ["## Privacy spent per site", "", "![epsilon per site](privacy_epsilon.png)", "",
              "| site | DP | epsilon spent | budget | delta | steps | unit |",
              "|---|---|---|---|---|---|---|"]
    for site in config.sites:
        privacy = config.privacy_of(site)
        path = out_dir / "sites" / site.name / LEDGER_FILE
        if privacy.enabled and path.exists():
            ledger = read_ledger(path)
            lines.append(f"| {site.name} | on | {ledger.epsilon:.3f} | {ledger.epsilon_budget:g} | "
                         f"{ledger.delta:.2e} | {ledger.steps} | {ledger.unit} |")
        else:
            lines.append(f"| {site.name} | **off** | - | - | - | - | - |")
    central = [r["central_epsilon"] for r in records if "central_epsilon" in r]
    if central and config.server.central_dp is not None:
        lines += ["", f"Central (site-level) DP at the server: epsilon {central[-1]:.3f} at delta "
                  f"{config.server.central_dp.delta:g} for a whole site's participation "
                  f"(clip {config.server.central_dp.clip:g}, noise multiplier "
                  f"{config.server.central_dp.noise_multiplier:g}), reported separately from "
                  "the record-level epsilon above."]
    accountants = sorted({config.privacy_of(s).accountant for s in config.sites})
    accounting = "; ".join(CONVERSIONS[a] for a in accountants)
    lines += ["", f"Accounting: {accounting}. The guarantee covers the encoder updates a site "
              "sends; the sizes of its training and validation sets and its validation accuracy "
              "are released outside it.", ""]
    if config.held_out is not None and held_out is not None:
        fs = config.held_out.fewshot
        lines += [f"## New site: {config.held_out.name}", "",
                  f"{fs.ways}-way {fs.shots}-shot, {fs.queries} queries per class, "
                  f"{held_out.episodes} episodes (mean ± 95% interval), adapted locally:", "",
                  "| encoder | accuracy |", "|---|---|",
                  f"| meta-learned (this run) | {_pct(held_out)} |"]
        if untrained is not None:
            lines.append(f"| untrained (same architecture, same episodes) | {_pct(untrained)} |")
        lines.append("")
    lines += ["## Files", "", "- `checkpoints/round-NNNN.pt`: the meta-model after each round "
              "(give the run folder to `medmeta adapt --checkpoint`)",
              "- `metrics.jsonl`, `rounds.csv`: per-round metrics", "- `sites/<name>/`: each "
              "simulated site's state (privacy ledger, local head); never shared", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
