"""The triage report: one self-contained HTML page that opens offline.

Everything is inside the file: styles, the sorting script, the histogram (inline
SVG, so it stays sharp when zoomed and needs no plotting library where the model
is served) and each study's thumbnail with its heat-map overlay (base64 JPEG).
Every text that comes from an input (paths, error messages) is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Row(Protocol):
    """What the report reads of a worklist row (``pneumoscan.apps.triage.Row`` has it): the report needs no triage import,
    so the two modules depend one way only (triage renders through the report)."""

    rank: int | None
    path: str
    probability: float | None
    label: str | None
    in_distribution: bool | None
    population: str | None
    threshold: float | None
    population_source: str | None
    population_note: str | None
    regions: str | None
    error: str | None
    status: str
    study_instance_uid: str | None

    @property
    def thumbnail_name(self) -> str: ...

#: Studies whose thumbnails are embedded (the top of the worklist); beyond it the page stays light.
MAX_EMBEDDED_THUMBNAILS = 2000
HISTOGRAM_BINS = 20

STYLE = """
:root { --pos: #b3261e; --neg: #1b6e3a; --warn: #8a5a00; --ink: #1d1d1f; --muted: #5f6368; --line: #dadce0; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0; padding: 1rem 1.25rem 3rem; }
h1 { font-size: 1.35rem; margin: 0 0 .25rem; } h2 { font-size: 1.05rem; margin: 1.5rem 0 .5rem; }
.muted { color: var(--muted); } .disclaimer { background: #fff4e5; border-left: 4px solid var(--warn); padding: .5rem .75rem; }
.cards { display: flex; flex-wrap: wrap; gap: .5rem; margin: .75rem 0; padding: 0; list-style: none; }
.cards li { border: 1px solid var(--line); border-radius: 8px; padding: .5rem .8rem; min-width: 8.5rem; }
.cards b { display: block; font-size: 1.4rem; }
.pos { color: var(--pos); } .neg { color: var(--neg); } .warn { color: var(--warn); }
svg text { font: 11px system-ui, sans-serif; fill: var(--ink); }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: .35rem .5rem; text-align: left; vertical-align: middle; }
th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; color: inherit; }
th[aria-sort="ascending"] button::after { content: " ▲"; } th[aria-sort="descending"] button::after { content: " ▼"; }
td.path { overflow-wrap: anywhere; min-width: 14rem; max-width: 30rem; } td.note { overflow-wrap: anywhere; max-width: 24rem; } td img { display: block; height: 64px; width: auto; border-radius: 3px; }
.bar { width: 6rem; height: .55rem; background: #eee; border-radius: 3px; position: relative; display: inline-block; margin-right: .4rem; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 3px; }
.bar i { position: absolute; top: -2px; bottom: -2px; width: 2px; background: var(--ink); }
#filter { font: inherit; padding: .3rem .5rem; width: min(24rem, 100%); margin-bottom: .5rem; }
"""

SCRIPT = """
(function () {
  const table = document.getElementById('worklist');
  const body = table.tBodies[0];
  table.querySelectorAll('th button').forEach((button, column) => {
    button.addEventListener('click', () => {
      const th = button.parentElement;
      const ascending = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(h => h.removeAttribute('aria-sort'));
      th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
      const numeric = th.dataset.type === 'number';
      const value = row => row.cells[column].dataset.value ?? row.cells[column].textContent;
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        let x = value(a), y = value(b);
        if (numeric) { x = x === '' ? -Infinity : Number(x); y = y === '' ? -Infinity : Number(y); }
        const order = x < y ? -1 : x > y ? 1 : 0;
        return ascending ? order : -order;
      });
      rows.forEach(row => body.appendChild(row));
    });
  });
  const filter = document.getElementById('filter');
  filter.addEventListener('input', () => {
    const needle = filter.value.toLowerCase();
    Array.from(body.rows).forEach(row => { row.hidden = needle !== '' && !row.textContent.toLowerCase().includes(needle); });
  });
})();
"""


def render_report(rows: Sequence[Row], summary: dict, thumbnails: Path) -> str:
    """The whole page as one string."""
    model = summary.get("model", {})
    threshold = float(model.get("threshold", 0.5))
    probabilities = [r.probability for r in rows if r.probability is not None]
    title = f"pneumoscan triage: {summary['scored']} studies scored"
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<header><h1>{html.escape(title)}</h1>",
            f'<p class="muted">{_model_line(model)} · created {html.escape(str(summary.get("created_at", "")))}'
            f" · pneumoscan {html.escape(str(summary.get('pneumoscan_version', '')))}</p></header>",
            '<p class="disclaimer" role="note">A decision aid for ordering the reading list, not a diagnosis. '
            "Every study must still be read by a qualified clinician.</p>",
            "<main>",
            '<h2 id="summary">Summary</h2>',
            _cards(summary),
            _drift(summary.get("drift") or {}),
            _performance(summary.get("performance")),
            '<h2 id="distribution">Probabilities</h2>',
            _histogram(probabilities, threshold),
            '<h2 id="studies">Worklist</h2>',
            _table(rows, threshold, thumbnails),
            "</main>",
            f"<script>{SCRIPT}</script>",
            "</body></html>",
        ]
    )


def _model_line(model: dict) -> str:
    if not model:
        return "model unknown"
    points = model.get("operating_points") or {}
    if len(points) > 1:
        described = "; ".join(f"{p}: {v['name']}, threshold {float(v['threshold']):.4f}" + (f" [{v['in_force']}]" if v.get("in_force") else "")
                              for p, v in points.items())  # fmt: skip
        return html.escape(f"model {model.get('name')} ({model.get('precision')}), operating points by population: {described}")
    return html.escape(
        f"model {model.get('name')} ({model.get('precision')}), operating point "
        f"{model.get('operating_point')}, threshold {float(model.get('threshold', 0)):.4f}"
    )


def _psi_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _drift(drift: dict) -> str:
    """Do these studies look like those the operating point was set on? The warning first, then each PSI."""
    if not drift.get("available"):
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(i['name'])}</td><td>{html.escape(i['population'] or 'all')}</td><td>{i['n']}</td>"
        f"<td>{_psi_text(i['psi'])}</td>"
        f"<td>{'shifted' if i['drifted'] else ('within' if i['judged'] else 'too few studies to judge')}</td></tr>"
        for i in drift["indicators"]
    )
    head = (f'<p class="disclaimer warn" role="alert">{html.escape(drift["message"])}</p>' if drift.get("warning") else
            f'<p class="muted">These studies look like those the operating point was set on ({html.escape(str(drift.get("reference")))}): '
            f"no indicator reaches PSI {drift['threshold']}.</p>")  # fmt: skip
    return (f'<h2 id="drift">Drift</h2>{head}<table aria-label="drift"><thead><tr><th>figure</th><th>population</th><th>studies</th>'
            f"<th>PSI</th><th>judged</th></tr></thead><tbody>{rows}</tbody></table>"
            f'<p class="muted">{html.escape(drift["method"])}.</p>')  # fmt: skip


def _share(p: dict) -> str:
    return "–" if p["value"] is None else f"{100 * p['value']:.1f} % ({100 * p['low']:.1f}–{100 * p['high']:.1f}; {p['k']}/{p['n']})"


def _performance(performance: dict | None) -> str:
    """What the radiologists' findings given with ``--readings`` say of the answers, per population and point."""
    if not performance:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(g['population'] or 'all')}</td><td>{html.escape(g['operating_point'])}</td><td>{g['n']}</td>"
        f"<td>{_share(g['sensitivity'])}</td><td>{_share(g['specificity'])}</td><td>{_share(g['ppv'])}</td>"
        f"<td>{_share(g['npv'])}</td><td>{g['counts']['false_negative']}</td></tr>"
        for g in performance["groups"]
    )
    warning = (f'<p class="disclaimer warn" role="alert">{html.escape(performance["message"])}</p>'
               if performance.get("warning") else "")  # fmt: skip
    unmatched = (f'<p class="muted">{len(performance["unmatched"])} finding(s) matched no study of the run.</p>'
                 if performance.get("unmatched") else "")  # fmt: skip
    return (f'<h2 id="performance">Against radiologists\' findings ({performance["read"]} studies)</h2>{warning}'
            '<table aria-label="performance"><thead><tr><th>population</th><th>operating point</th><th>read studies</th>'
            "<th>sensitivity (95 % CI)</th><th>specificity (95 % CI)</th><th>PPV</th><th>NPV</th><th>missed</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{unmatched}")


def _cards(summary: dict) -> str:
    labels = summary.get("labels", {})
    timing = summary.get("timing", {})
    cards = [
        ("studies scored", summary.get("scored", 0), ""),
        ("above threshold (PNEUMONIA)", labels.get("PNEUMONIA", 0), "pos"),
        ("below threshold (NORMAL)", labels.get("NORMAL", 0), "neg"),
        ("not validated for this image (no verdict)", summary.get("out_of_distribution", 0), "warn"),
        ("skipped (not an image pneumoscan reads)", summary.get("skipped", 0), ""),
        ("errors", summary.get("errors", 0), "warn" if summary.get("errors") else ""),
    ]
    items = "".join(f'<li class="{css}"><b>{value}</b>{html.escape(name)}</li>' for name, value, css in cards)
    rate = timing.get("images_per_second")
    footer = f'<p class="muted">{rate:.1f} images/s in this run ({html.escape(str(timing.get("machine", "")))}).</p>' if rate else ""
    return f'<ul class="cards" aria-label="counts">{items}</ul>{footer}'


def _histogram(probabilities: list[float], threshold: float) -> str:
    """Counts of studies per probability bin, the threshold drawn across; bars right of it in the alarm colour."""
    if not probabilities:
        return '<p class="muted">No study was scored.</p>'
    counts = [0] * HISTOGRAM_BINS
    for p in probabilities:
        counts[min(int(p * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    width, height, left, bottom, top = 640, 220, 40, 30, 12
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(counts)
    bars = []
    for i, count in enumerate(counts):
        bar_h = plot_h * count / peak
        x = left + plot_w * i / HISTOGRAM_BINS
        colour = "#b3261e" if (i + 0.5) / HISTOGRAM_BINS >= threshold else "#1b6e3a"
        bars.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{plot_w / HISTOGRAM_BINS - 2:.1f}" '
            f'height="{bar_h:.1f}" fill="{colour}"><title>{i / HISTOGRAM_BINS:.2f}–{(i + 1) / HISTOGRAM_BINS:.2f}: '
            f"{count} studies</title></rect>"
        )
    ticks = "".join(
        f'<text x="{left + plot_w * t:.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:.1f}</text>' for t in (0, 0.25, 0.5, 0.75, 1.0)
    )
    x_threshold = left + plot_w * threshold
    return (
        f'<figure><svg viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px" role="img" '
        f'aria-label="Histogram of {len(probabilities)} calibrated probabilities; threshold {threshold:.3f}">'
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#5f6368"/>'
        f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>'
        + "".join(bars)
        + ticks
        + f'<line x1="{x_threshold:.1f}" y1="{top - 4}" x2="{x_threshold:.1f}" y2="{top + plot_h}" stroke="#1d1d1f" '
        f'stroke-dasharray="4 3" stroke-width="2"/>'
        f'<text x="{x_threshold + 4:.1f}" y="{top + 8}">threshold {threshold:.3f}</text>'
        "</svg>"
        "<figcaption class=\"muted\">Calibrated probability of pneumonia per study (x) and number of studies (y); "
        "studies right of the dashed line are reported as PNEUMONIA.</figcaption></figure>"
    )


def _common_folder(rows: Sequence[Row]) -> str:
    """The folder all inputs share: the table shows paths below it, which is what tells studies apart."""
    paths = [row.path for row in rows]
    if len(paths) < 2:
        return ""
    try:
        common = os.path.commonpath(paths)
    except ValueError:  # absolute and relative paths mixed
        return ""
    return "" if common in paths else common


def _table(rows: Sequence[Row], threshold: float, thumbnails: Path) -> str:
    folder = _common_folder(rows)
    header = (
        (f'<p class="muted">Paths below <code>{html.escape(folder)}</code>.</p>' if folder else "") + 
        '<input id="filter" type="search" placeholder="Filter by path, label or error" aria-label="Filter the worklist">'
        '<table id="worklist"><thead><tr>'
        '<th data-type="number" aria-sort="ascending"><button type="button">rank</button></th>'
        '<th><button type="button">X-ray · heat map</button></th>'
        '<th><button type="button">path</button></th>'
        '<th data-type="number"><button type="button">probability</button></th>'
        '<th><button type="button">label</button></th>'
        '<th><button type="button">note</button></th>'
        "</tr></thead><tbody>"
    )
    body = [_table_row(row, threshold, thumbnails, index < MAX_EMBEDDED_THUMBNAILS, folder) for index, row in enumerate(rows)]
    footer = "</tbody></table>"
    if len(rows) > MAX_EMBEDDED_THUMBNAILS:
        footer += (
            f'<p class="muted">Thumbnails are embedded for the first {MAX_EMBEDDED_THUMBNAILS} studies; '
            "the others are in the thumbnails folder beside this report.</p>"
        )
    return header + "".join(body) + footer


def _table_row(row: Row, threshold: float, thumbnails: Path, embed: bool, folder: str) -> str:
    picture = ""
    thumbnail = thumbnails / row.thumbnail_name
    if embed and row.probability is not None and thumbnail.is_file():
        data = base64.b64encode(thumbnail.read_bytes()).decode("ascii")
        picture = f'<img src="data:image/jpeg;base64,{data}" alt="X-ray and heat map of rank {row.rank}" loading="lazy">'
    threshold = row.threshold if row.threshold is not None else threshold  # each study's own population's
    if row.probability is None:
        probability_cell = '<td data-value="">–</td>'
        label_cell = f'<td>{"skipped" if row.status == "skipped" else "error"}</td>'
    elif row.in_distribution is False:  # no red or green verdict: the reason first, the probability muted beneath
        probability_cell = f'<td data-value="{row.probability:.6f}" class="muted">({row.probability:.3f})</td>'
        label_cell = '<td class="unvalidated"><b>not validated for this image</b><br><span class="muted">for reference only</span></td>'
    else:
        colour = "#b3261e" if row.probability >= threshold else "#1b6e3a"
        probability_cell = (
            f'<td data-value="{row.probability:.6f}"><span class="bar" aria-hidden="true">'
            f'<span style="width:{row.probability * 100:.1f}%;background:{colour}"></span><i style="left:{threshold * 100:.1f}%"></i>'
            f"</span>{row.probability:.3f}</td>"
        )
        css = "pos" if row.label == "PNEUMONIA" else "neg"
        label_cell = f'<td class="{css}">{html.escape(row.label or "")}</td>'
    notes = []
    if row.in_distribution is False:
        notes.append('<span class="warn">unlike the chest X-rays this model was validated on</span>')
    if row.population:
        notes.append(f'<span class="muted">{html.escape(row.population)} operating point'
                     f'{f", threshold {row.threshold:.3f}" if row.threshold is not None else ""}'
                     f' ({html.escape(row.population_source or "")})</span>')
    if row.population_note:
        notes.append(f'<span class="warn">{html.escape(row.population_note)}</span>')
    if row.regions and (regions := json.loads(row.regions)):
        notes.append(f'<span class="regions">{len(regions)} region{"s" if len(regions) > 1 else ""} (green on the film): '
                     + html.escape(", ".join(f"{r['width']:.0f}×{r['height']:.0f} px at {r['x']:.0f},{r['y']:.0f}, "
                                             f"score {r['score']:.2f}" for r in regions)) + "</span>")  # fmt: skip
    if row.error:
        notes.append(html.escape(row.error))
    if row.study_instance_uid:
        notes.append(f'<span class="muted">study {html.escape(row.study_instance_uid)}</span>')
    return (
        f'<tr><td data-value="{row.rank}">{row.rank}</td><td>{picture}</td>'
        f'<td class="path" title="{html.escape(row.path)}">{html.escape(os.path.relpath(row.path, folder) if folder else row.path)}</td>'
        f'{probability_cell}{label_cell}<td class="note">{"<br>".join(notes)}</td></tr>'
    )
