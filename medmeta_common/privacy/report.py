"""A per-site privacy report a privacy officer can file (Markdown or HTML).

Everything in it comes from the site's own privacy ledger: the guarantee (ε, δ, the
privacy unit), how it was accounted, the mechanism's settings round by round, ε over
the rounds as a plot, and exactly what the site sent out.
"""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime

from medmeta_common.figures import finished_png
from medmeta_common.privacy.accounting import CONVERSIONS
from medmeta_common.privacy.ledger import PrivacyLedger
from medmeta_common.protocol import EVALUATE_METRICS, TRAIN_METRICS

SENT = [
    ("train reply, every round trained",
     "the shared encoder's parameters (float32 arrays; or, with server.update_encoding "
     "float16/int8, their change since the global encoder in that precision; covered by "
     "the DP guarantee), "
     "the number of training images, and the scalar metrics "
     + ", ".join(sorted(TRAIN_METRICS - {"train-loss"}))
     + " (train-loss only when DP is off)"),
    ("evaluate reply, or a train reply's 'validation' record, when asked",
     "the validation metric of the site's task on its validation patients (classification: "
     "few-shot accuracy; segmentation: Dice; detection: mAP@0.5 as map50 and mAP@[.5:.95] "
     "as map) and the number of validation images: "
     + ", ".join(sorted(EVALUATE_METRICS)) + " (not covered by the DP guarantee)"),
    ("query reply, once per connection", "the site's name"),
    ("never", "images, labels, boxes, masks, patient identifiers, per-record gradients, "
              "the site's classifier head, decoder or detection head, the privacy ledger, "
              "its message timings (message_times.jsonl)"),
]


def epsilon_plot_png(ledger: PrivacyLedger) -> bytes:
    """ε after each round (and the budget) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    rounds = [r.round for r in ledger.rounds]
    ax.plot(range(1, len(rounds) + 1), [r.epsilon for r in ledger.rounds], marker="o",
            label="epsilon spent")
    ax.axhline(ledger.epsilon_budget, color="red", linestyle="--", label="budget")
    ax.set_xlabel("rounds trained")
    ax.set_ylabel(f"epsilon (delta = {ledger.delta:.1e})")
    ax.set_title(f"Privacy spent at site {ledger.site}", fontsize=10)
    return finished_png(fig, ax)


def report_rows(ledger: PrivacyLedger) -> list[list[str]]:
    """One row per round trained: round, steps, noise, rate, clip, ε after."""
    return [[str(r.round), str(r.steps), f"{r.noise_multiplier:.4g}", f"{r.sample_rate:.4g}",
             "-" if r.max_grad_norm is None else f"{r.max_grad_norm:g}", f"{r.epsilon:.4f}"]
            for r in ledger.rounds]


HEADER = ["round", "DP-SGD steps", "noise multiplier", "sampling rate", "clip norm",
          "epsilon after"]


def summary(ledger: PrivacyLedger) -> list[tuple[str, str]]:
    """The facts at the top of the report."""
    unit = "one image (record)" if ledger.unit == "image" else f"one {ledger.unit}"
    return [
        ("Site", ledger.site),
        ("Guarantee", f"({ledger.epsilon:.4f}, {ledger.delta:.2e})-differential privacy of "
                      f"the encoder updates the site sent, with respect to adding or removing "
                      f"{unit} (see 'What left the site' for what is outside it)"),
        ("Budget", f"epsilon {ledger.epsilon_budget:g}; training is refused once the next "
                   "round would exceed it"),
        ("Privacy unit", ledger.unit),
        ("Mechanism", "DP-SGD (Opacus): per-record gradients clipped to the clip norm, "
                      "Gaussian noise of standard deviation noise multiplier x clip norm, "
                      "Poisson sampling of records at the sampling rate"),
        ("Accountant", f"the sampled Gaussian mechanism composed over all {ledger.steps} "
                       f"steps: {CONVERSIONS[ledger.accountant]}"),
        ("Rounds trained", str(len(ledger.rounds))),
    ]


def to_markdown(ledger: PrivacyLedger, plot_file: str) -> str:
    """The report as Markdown; the plot is the PNG file ``plot_file`` beside it."""
    lines = [f"# Privacy report: site {ledger.site}", "",
             f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from the site's "
             "privacy ledger.", ""]
    lines += [f"- **{k}:** {v}" for k, v in summary(ledger)]
    lines += ["", f"![epsilon over rounds]({plot_file})", "", "## Rounds", "",
              "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in report_rows(ledger)]
    lines += ["", "## What left the site", ""]
    lines += [f"- **{when}:** {what}" for when, what in SENT]
    return "\n".join(lines) + "\n"


def to_html(ledger: PrivacyLedger) -> str:
    """The report as one self-contained HTML page (the plot embedded)."""
    png = base64.b64encode(epsilon_plot_png(ledger)).decode()
    esc = html.escape
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary(ledger))
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                   for row in report_rows(ledger))
    sent = "".join(f"<li><b>{esc(w)}:</b> {esc(x)}</li>" for w, x in SENT)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Privacy report: "
            f"{esc(ledger.site)}</title><style>body{{font-family:sans-serif;max-width:60em}}"
            "th{text-align:left}td,th{padding:2px 8px}</style></head><body>"
            f"<h1>Privacy report: site {esc(ledger.site)}</h1>"
            f"<p>Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from the site's "
            f"privacy ledger.</p><table>{facts}</table>"
            f"<p><img alt='epsilon over rounds' src='data:image/png;base64,{png}'></p>"
            f"<h2>Rounds</h2><table><tr>{head}</tr>{rows}</table>"
            f"<h2>What left the site</h2><ul>{sent}</ul></body></html>\n")
