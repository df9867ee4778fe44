"""The study as one self-contained HTML page: inline CSS, figures as data URIs, no script.

A report that is mailed, archived with an ethics submission, or opened on a hospital machine
without internet must read the same everywhere, so nothing is fetched: a Content-Security-Policy
forbids it and every figure travels inside the file. Every string from the data is escaped.
"""

from __future__ import annotations

import struct
from html import escape

from medfed.report import figures
from medfed.report.decentral_view import (
    DECENTRAL_SECTION,
    GRID_CAPTION,
    decentral_tables,
    one_shot_sentence,
    peer_sentence,
)
from medfed.report.ledger_view import LEDGER_SECTION, has_ledgers, ledger_html
from medfed.report.load import DECENTRAL, FEDERATED, Study
from medfed.report.privacy_view import PRIVACY_NOTE, privacy_tables
from medfed.report.tables import Table, all_tables, site_splits
from medfed.report.text import (
    METRIC_LABELS,
    budget_sentence,
    fmt_date,
    method_note,
    narrative,
    overlay_columns,
)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
body { margin: 0; background: #fff; color: #1b1f23; line-height: 1.5;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 24px 56px; }
h1 { font-size: 1.65rem; margin: 0 0 .15rem; }
.subtitle { color: #57606a; margin: 0 0 1rem; font-size: 1.05rem; }
h2 { font-size: 1.25rem; margin: 2.4rem 0 .8rem; padding-bottom: .3rem; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 1.02rem; margin: 1.4rem 0 .5rem; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1.2rem; margin: 0 0 1rem;
  font-size: .92rem; }
dl.meta dt { color: #57606a; } dl.meta dd { margin: 0; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .88em;
  background: #f3f5f7; padding: .05em .3em; border-radius: 3px; word-break: break-all; }
.budget { font-size: .95rem; }
.summary { background: #f4f8fb; border-left: 4px solid #0072B2; padding: .8rem 1.1rem; margin: .8rem 0; }
.summary p { margin: .5rem 0; }
.note, figcaption { color: #57606a; font-size: .84rem; }
nav { font-size: .88rem; margin: 1rem 0 0; } nav a { color: #0969da; margin-right: .9rem; }
.table-wrap { overflow-x: auto; margin: .4rem 0 .3rem; }
table { border-collapse: collapse; font-size: .84rem; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: 0 0 .4rem; font-size: .95rem; }
th, td { border: 1px solid #e1e4e8; padding: 4px 7px; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; text-align: center; }
thead tr.groups th { background: #eef2f6; }
td { text-align: right; }
td.lead { text-align: left; white-space: nowrap; }
tr.detail td.lead { padding-left: 1.6rem; color: #57606a; }
tr.detail td { color: #57606a; font-size: .95em; }
tr.highlight td { background: #fdf6f0; }
tr.highlight td[rowspan] { background: #fff; }
tbody tr.first td { border-top: 2px solid #c9d1d9; }
.ci { display: block; font-size: .8em; color: #6e7781; white-space: nowrap; }
.figrow { display: flex; flex-wrap: wrap; gap: 0 28px; }
.figcell { flex: 0 1 auto; min-width: 0; max-width: 100%; }
figure { margin: .6rem 0 1.6rem; display: table; }
figcaption { display: table-caption; caption-side: bottom; padding-top: .3rem; }
figure img { display: block; max-width: 100%; height: auto; }
.placeholder { border: 1px dashed #afb8c1; color: #57606a; padding: 2.2rem 4rem; text-align: center;
  border-radius: 4px; }
footer { margin-top: 3rem; color: #6e7781; font-size: .8rem; }
@media print { main { max-width: none; padding: 0; } h2 { break-after: avoid; }
  figure, table { break-inside: avoid; } nav { display: none; } }
"""

SECTIONS = (
    ("summary", "What this means"),
    ("performance", "Performance"),
    ("roc", "ROC curves"),
    ("learning", "Learning curves"),
    ("sites", "Per-site performance"),
    ("communication", "Communication"),
    ("timing", "Wall time"),
    ("comparisons", "Statistical comparisons"),
)
SEGMENTATION_SECTIONS = tuple(
    ("overlays", "Example segmentations") if key == "roc" else (key, title)
    for key, title in SECTIONS
)
"""A segmentation study has no ROC curves; its example overlays take their place."""


PRIVACY_SECTION = ("privacy", "Privacy")
"""Only for a study in which some network trained with differential privacy."""


def sections(study: Study) -> tuple[tuple[str, str], ...]:
    base = SEGMENTATION_SECTIONS if study.segmentation else SECTIONS
    if study.decentral.enabled:
        base = (*base, DECENTRAL_SECTION)
    if has_ledgers(study.directory):  # runs that keep a ledger (medfed.audit)
        base = (*base, LEDGER_SECTION)
    return (*base, PRIVACY_SECTION) if study.privacy.enabled else base


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, so the page lays out before images decode."""
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _img(png: bytes, alt: str) -> str:
    w, h = _png_size(png)
    return f'<img src="{figures.data_uri(png)}" alt="{escape(alt)}" width="{w}" height="{h}">'


def _figure(png: bytes | None, *, alt: str, caption: str, placeholder: str) -> str:
    """A figure, or a placeholder without a caption: a caption would describe curves not shown."""
    if png is None:
        return f'<figure><div class="placeholder">{placeholder}</div></figure>'
    return f"<figure>{_img(png, alt)}<figcaption>{caption}</figcaption></figure>"


def render_table(table: Table) -> str:
    head = []
    if table.groups:
        lead = "".join(f'<th rowspan="2">{escape(c)}</th>' for c in table.columns[: table.lead])
        groups = "".join(f'<th colspan="{g.span}">{escape(g.label)}</th>' for g in table.groups)
        rest = "".join(f"<th>{escape(c)}</th>" for c in table.columns[table.lead :])
        head = [f'<tr class="groups">{lead}{groups}</tr>', f"<tr>{rest}</tr>"]
    else:
        head = ["<tr>" + "".join(f"<th>{escape(c)}</th>" for c in table.columns) + "</tr>"]
    body = []
    rows = table.rows
    for i, row in enumerate(rows):
        cells = []
        first = row.cells[0].text if row.cells else ""
        starts = i == 0 or rows[i - 1].cells[0].text != first
        for j, cell in enumerate(row.cells):
            cls = ' class="lead"' if table.is_text(j) else ""
            ci = f'<span class="ci">{escape(cell.ci)}</span>' if cell.ci else ""
            if j == 0 and table.merge_lead:
                if not starts:
                    continue
                span = 1
                while i + span < len(rows) and rows[i + span].cells[0].text == first:
                    span += 1
                cls = f' class="lead" rowspan="{span}"' if span > 1 else cls
            cells.append(f"<td{cls}>{escape(cell.text)}{ci}</td>")
        flags = (
            ("detail", row.detail),
            ("highlight", row.highlight),
            ("first", table.merge_lead and starts and i > 0),
        )
        classes = " ".join(c for c, on in flags if on)
        attr = f' class="{classes}"' if classes else ""
        body.append(f"<tr{attr}>{''.join(cells)}</tr>")
    note = f'<p class="note">{escape(table.note)}</p>' if table.note else ""
    return (
        f'<div class="table-wrap"><table id="table-{escape(table.key)}">'
        f"<caption>{escape(table.title)}</caption>"
        f"<thead>{''.join(head)}</thead><tbody>{''.join(body)}</tbody></table></div>{note}"
    )


def _header(study: Study) -> str:
    m = study.meta
    models = ", ".join(f"{escape(n)} (<code>{escape(m.models[n])}</code>)" for n in m.networks)
    rows: tuple[tuple[str, str], ...] = (
        ("Date", escape(fmt_date(m.created))),
        ("Networks", models),
        ("Strategy", escape(m.strategy)),
        ("Sites", escape(", ".join(m.sites))),
        ("External site", escape(m.external_site) if m.external_site else "none held out"),
        ("Device", escape(m.device)),
        ("Config hash", f"<code>{escape(study.config_hash)}</code>"),
        ("medfed", escape(m.medfed_version)),
    )
    if study.segmentation:
        rows = (("Task", "Segmentation"), *rows)
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title in sections(study))
    return (
        "<header><h1>Federated learning study report</h1>"
        f'<p class="subtitle">{escape(m.name)}</p><dl class="meta">{items}</dl>'
        f'<p class="budget"><strong>Training budget.</strong> {escape(budget_sentence(study))}</p>'
        f"<nav>{nav}</nav></header>"
    )


def _summary(study: Study) -> str:
    paras = "".join(
        f"<p><strong>{escape(name)}:</strong> {escape(text)}</p>" for name, text in narrative(study)
    )
    note = escape(method_note(study))
    return f'<div class="summary">{paras}</div><p class="note">{note}</p>'


def _overlays(study: Study) -> str:
    """The study's own PNGs, inlined as they are; a placeholder names what could not be read."""
    out = []
    for net in study.meta.networks:
        name = escape(net)
        overlay = study.overlays.get(net)
        png = overlay.png if overlay is not None else None
        problem = overlay.problem if overlay is not None else "no overlay image recorded"
        caption = f"{name}: validation images from each site. Columns: {overlay_columns(study)}."
        fig = _figure(
            png,
            alt=f"Example segmentations by {net}",
            caption=caption,
            placeholder=f"{name}: {escape(problem)}",
        )
        out.append(f'<div class="figcell"><h3>{name}</h3>{fig}</div>')
    return f'<div class="figrow">{"".join(out)}</div>'


def _figures(study: Study, kind: str) -> str:
    label = METRIC_LABELS[study.headline]
    out = []
    for net in study.meta.networks:
        name = escape(net)
        if kind == "roc":
            png: bytes | None = figures.roc_figure(study, net)
            caption = (
                f"{name}: ROC curves of every model on the same cases. Thick lines: federated "
                "and centralized (dots: their operating point at the fixed threshold); thin "
                "lines: local-only models; "
                + (
                    "dashed lines: peer-to-peer and one-shot models; "
                    if any(study.has(p) for p in DECENTRAL)
                    else ""
                )
                + "dashed diagonal: chance."
            )
            alt = f"ROC curves for {net}"
        elif kind == "learning":
            png = figures.learning_figure(study, net)
            caption = (
                f"{name}: validation {label} and mean training loss of the {FEDERATED} run per "
                "round; the centralized run, evaluated after the same share of the training "
                "budget, for reference."
            )
            if study.segmentation:
                caption += " Dashed: the external site."
            alt = f"Learning curves for {net}"
        else:
            png = figures.site_figure(study, net)
            chance = "" if study.segmentation else "; dashed line: chance"
            caption = f"{name}: {label} on each site's own validation split"
            if len(site_splits(study)) > len(study.meta.sites):
                caption += f" and on the external site ({escape(study.meta.external_site or '')})"
            caption += f" with 95% CI{chance}."
            if any(study.has(p) for p in DECENTRAL):
                caption += (
                    " Hatched: the consensus of the site models (cyclic, gossip) or the distilled "
                    "student (one-shot)."
                )
            alt = f"Per-site {label} for {net}"
        fig = _figure(png, alt=alt, caption=caption, placeholder=f"{name}: no history recorded")
        out.append(f'<div class="figcell"><h3>{name}</h3>{fig}</div>')
    return f'<div class="figrow">{"".join(out)}</div>'


def _privacy(study: Study) -> str:
    """The ε and cost tables, then each DP network's ε per round."""
    tables = "".join(render_table(t) for t in privacy_tables(study).values())
    out = []
    for net in study.meta.networks:
        if study.privacy.of(net) is None:
            continue
        png = figures.epsilon_figure(study, net)
        caption = (
            f"{escape(net)}: ε spent by the most-exposed site after each round, per run; dashed: "
            "the budget."
        )
        fig = _figure(
            png,
            alt=f"Privacy spent per round by {net}",
            caption=caption,
            placeholder=f"{escape(net)}: no per-round ε recorded",
        )
        out.append(f'<div class="figcell"><h3>{escape(net)}</h3>{fig}</div>')
    note = f'<p class="note">{escape(PRIVACY_NOTE)}</p>'
    return f'{tables}<div class="figrow">{"".join(out)}</div>{note}'


def _decentral(study: Study) -> str:
    """Peer-to-peer site models, the one-shot comparison, and each synthesis grid inlined."""
    prose = [peer_sentence(r) for r in study.decentral.peer]
    prose += [x for shot in study.decentral.one_shot if (x := one_shot_sentence(study, shot))]
    paras = "".join(f"<p>{escape(x)}</p>" for x in prose)
    tables = "".join(render_table(t) for t in decentral_tables(study).values())
    grids = []
    for shot in study.decentral.one_shot:
        name = escape(shot.network)
        fig = f'<figure><div class="placeholder">{name}: {escape(shot.problem)}</div></figure>'
        if shot.png is not None:  # a grid of small images: enlarged whole-pixel, not blurred
            w, h = _png_size(shot.png)
            k = max(1, min(8, 480 // max(w, 1)))
            alt = escape(f"Images synthesized by one-shot FedISCA for {shot.network}")
            fig = (
                f'<figure><img src="{figures.data_uri(shot.png)}" alt="{alt}" width="{k * w}" '
                f'height="{k * h}" style="image-rendering: pixelated">'
                f"<figcaption>{name}: {escape(GRID_CAPTION)}</figcaption></figure>"
            )
        grids.append(f'<div class="figcell"><h3>{name}</h3>{fig}</div>')
    return f'<div class="summary">{paras}</div>{tables}<div class="figrow">{"".join(grids)}</div>'


def render_html(study: Study) -> str:
    tables = {k: render_table(t) for k, t in all_tables(study).items()}
    performance = list(tables.values())[:2]  # Tables 1 and 2, whatever the task calls them
    content = {
        "summary": _summary(study),
        "performance": "".join(performance),
        "roc": "" if study.segmentation else _figures(study, "roc"),
        "overlays": _overlays(study) if study.segmentation else "",
        "learning": _figures(study, "learning"),
        "sites": tables["sites"] + _figures(study, "sites"),
        "communication": tables["communication"],
        "timing": tables["timing"],
        "comparisons": tables["comparisons"],
        "privacy": _privacy(study) if study.privacy.enabled else "",
        "decentral": _decentral(study) if study.decentral.enabled else "",
        "ledger": ledger_html(study.directory),
    }
    body = "".join(
        f'<section id="{key}"><h2>{title}</h2>{content[key]}</section>'
        for key, title in sections(study)
    )
    sources = "the overlay images" if study.segmentation else "predictions.csv"
    footer = (
        f"<footer>Generated by medfed {escape(study.meta.medfed_version)} from results.json and "
        f"{sources} in the study directory. This file is self-contained.</footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(study.meta.name)} — medfed study report</title>"
        f"<style>{CSS}</style></head>\n<body><main>{_header(study)}{body}{footer}</main></body>"
        "</html>\n"
    )
