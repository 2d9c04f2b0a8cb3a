"""The dashboard page: one HTML document from a :class:`~server.run_view.RunView`.

Every value is escaped; the page has no scripts and refreshes itself every
``refresh`` seconds. Elements carry ``id``/``data-`` attributes (``#run``, ``#sites``,
``tr[data-site]``, ``.epsilon``) so a browser test can read what an operator reads.
"""

from __future__ import annotations

import time
from html import escape

from server.dashboard.charts import line_chart
from server.run_view import RunView, SiteView, duration

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 0.25em 0.7em; text-align: left;
 border-bottom: 1px solid #ddd; vertical-align: top; }
.status-accepted { color: #1a7f37; }
.status-failed, .status-rejected, .run-failed { color: #b42318; }
.status-refused, .status-dropped, .stale { color: #b54708; }
.muted { color: #777; } .chart text { font-size: 11px; } .chart .title { font-weight: bold; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; }
"""


def _summary(view: RunView, now: float) -> str:
    rows = [("status", f'<span class="run-{escape(view.status)}">{escape(view.status)}</span>'),
            ("rounds done", f"{view.rounds_done} of {view.rounds_planned or '?'}")]
    if view.current_round is not None:
        started = now - view.phase_started if view.phase_started else None
        phase = escape(view.current_phase or "")
        rows.append(("in progress", f"round {view.current_round}, {phase} (for "
                                    f"{duration(started)}; about {duration(view.eta_seconds)} "
                                    "left)"))
    if view.failure:
        rows.append(("failure", escape(view.failure)))
    if view.failed_attempts:
        rows.append(("failed attempts", str(view.failed_attempts)))
    if view.central_epsilon is not None:
        rows.append(("site-level epsilon", f"{view.central_epsilon:.3f}"))
    rows += [("config hash", f'<code id="config-hash">{escape(view.config_hash or "?")}</code>'),
             ("latest checkpoint", escape(view.checkpoints[-1] if view.checkpoints else "none")),
             ("state directory", f"<code>{escape(view.state_dir)}</code>"),
             ("updated", f"{duration(now - view.updated)} ago" if view.updated else "?")]
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<dl id="run" data-status="{escape(view.status)}">{items}</dl>'


def _site_row(site: SiteView, now: float) -> str:
    spent = "-" if site.epsilon is None else f"{site.epsilon:.3f}"
    budget = "?" if site.epsilon_budget is None else f"{site.epsilon_budget:g}"
    stale = ' <span class="stale">(stale: from round ' \
        f"{site.epsilon_round})</span>" if site.epsilon_stale else ""
    age = site.age(now)
    return (f'<tr data-site="{escape(site.name)}">'
            f"<td>{escape(site.name)}</td>"
            f'<td class="status status-{escape(site.status)}">{escape(site.status)}</td>'
            f'<td class="reason">{escape(site.reason or "")}</td>'
            f'<td class="contact">{"never" if age is None else duration(age) + " ago"}'
            f"{'' if site.last_round is None else f' (round {site.last_round})'}</td>"
            f'<td><span class="epsilon">{spent}</span> of <span class="budget">{budget}'
            f"</span>{stale}</td>"
            f'<td class="accepted">{site.accepted_rounds}</td></tr>')


def _rounds(view: RunView, limit: int = 30) -> str:
    lines = []
    for row in reversed(view.rounds[-limit:]):
        label = f"{row['round']}" + (f" (failed attempt {row['attempt']})"
                                     if row["phase"] == "failed" else "")
        sites = "; ".join(f"{escape(name)}: {escape(m['reason'] or 'accepted')}"
                          for name, m in row["sites"].items())
        lines.append(f'<tr class="round-{escape(str(row["phase"]))}"><td>{escape(label)}</td>'
                     f"<td>{row['accepted']}</td><td>{sites}</td></tr>")
    body = "".join(lines) or '<tr><td colspan="3" class="muted">no round yet</td></tr>'
    return ('<table id="rounds"><tr><th>round</th><th>accepted</th>'
            f"<th>sites (reason when not accepted)</th></tr>{body}</table>")


def render(view: RunView, *, refresh: int = 10, now: float | None = None) -> str:
    """The whole page."""
    now = time.time() if now is None else now
    sites = "".join(_site_row(s, now) for s in sorted(view.sites.values(), key=lambda s: s.name))
    curves = line_chart({"mean": view.curve}, y_label="accuracy",
                        title="Few-shot validation accuracy, mean over the sites")
    per_site = line_chart(view.site_curves, y_label="accuracy / Dice",
                          title="Validation metric per site (accuracy; Dice for segmentation)")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<title>medmeta: {escape(view.status)}, round {view.rounds_done}</title>
<style>{STYLE}</style></head>
<body>
<h1>medmeta federation</h1>
{_summary(view, now)}
<h2>Sites</h2>
<table id="sites"><tr><th>site</th><th>last status</th><th>reason</th><th>last report</th>
<th>epsilon spent of budget</th><th>accepted rounds</th></tr>{sites}</table>
<h2>Learning curves</h2>
{curves}
{per_site}
<h2>Rounds (newest first)</h2>
{_rounds(view)}
<p class="muted">Read-only view of {escape(view.state_dir)}; refreshes every {refresh} s.</p>
</body></html>
"""
