"""The study as GitHub Markdown: the same prose and tables as the HTML, without figures.

Meant for a pull request, a wiki page or a diff between two studies, where a text file that
changes line by line beats a page of images. A segmentation study's example overlays are already
PNG files in the study directory, so they are linked by relative path rather than left out.
"""

from __future__ import annotations

from urllib.parse import quote

from medfed.report.decentral_view import decentral_markdown
from medfed.report.load import Study
from medfed.report.privacy_view import PRIVACY_NOTE, privacy_tables
from medfed.report.tables import Table, all_tables
from medfed.report.text import budget_sentence, fmt_date, method_note, narrative, overlay_columns

_BACKSLASHED = str.maketrans({c: "\\" + c for c in "\\|*_`"})


def escape_md(text: str) -> str:
    """Neutralise what would turn data into markup: HTML tags, table pipes, emphasis, links."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.translate(_BACKSLASHED).replace("](", "\\](")


def _cell(text: str, ci: str) -> str:
    return escape_md(f"{text} {ci}".strip())


def render_table(table: Table) -> str:
    columns = list(table.columns[: table.lead])
    legend = []
    if table.groups:
        k = table.lead
        for g in table.groups:
            columns += [f"{g.short} {c}" for c in table.columns[k : k + g.span]]
            k += g.span
            if g.short != g.label:
                legend.append(f"{g.short}: {g.label}")
    else:
        columns = list(table.columns)
    lines = [
        f"**{escape_md(table.title)}**",
        "",
        "| " + " | ".join(escape_md(c) for c in columns) + " |",
        "|" + "|".join(":---" if table.is_text(i) else "---:" for i in range(len(columns))) + "|",
    ]
    for row in table.rows:
        cells = [_cell(c.text, c.ci) for c in row.cells]
        if row.detail and len(cells) > 1:
            cells[1] = "↳ " + cells[1]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [escape_md(x) for x in (*legend, table.note) if x]
    if notes:
        lines += ["", *(f"_{n}_" if i == len(notes) - 1 else f"{n}  " for i, n in enumerate(notes))]
    return "\n".join(lines)


def _overlays(study: Study) -> list[str]:
    out = ["## Example segmentations", ""]
    for net in study.meta.networks:
        overlay = study.overlays.get(net)
        if overlay is not None and overlay.png is not None and overlay.path is not None:
            out.append(f"![Example segmentations by {escape_md(net)}]({quote(overlay.path)})")
        else:
            problem = overlay.problem if overlay is not None else "no overlay image recorded"
            out.append(f"_{escape_md(f'{net}: {problem}')}_")
        out.append("")
    out += [
        f"_Validation images from each site. Columns: {escape_md(overlay_columns(study))}._",
        "",
    ]
    return out


def render_markdown(study: Study) -> str:
    m = study.meta
    tables = all_tables(study)
    keys = list(tables)
    meta = [
        ("Study", m.name),
        ("Date", fmt_date(m.created)),
        ("Networks", ", ".join(f"{n} ({m.models[n]})" for n in m.networks)),
        ("Strategy", m.strategy),
        ("Sites", ", ".join(m.sites)),
        ("External site", m.external_site or "none held out"),
        ("Device", m.device),
        ("Config hash", study.config_hash),
        ("medfed", m.medfed_version),
    ]
    if study.segmentation:
        meta.insert(1, ("Task", "Segmentation"))
        figures = "Figures (learning curves, per-site Dice) are in `report.html`."
    else:
        figures = "Figures (ROC curves, learning curves, per-site AUC) are in `report.html`."
    out = [
        f"# Federated learning study report: {escape_md(m.name)}",
        "",
        *(f"- **{k}:** {escape_md(v)}" for k, v in meta),
        "",
        f"**Training budget.** {escape_md(budget_sentence(study))}",
        "",
        figures,
        "",
        "## What this means",
        "",
    ]
    for name, text in narrative(study):
        out += [f"**{escape_md(name)}:** {escape_md(text)}", ""]
    out += [f"_{escape_md(method_note(study))}_", ""]
    headings: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("Performance", tuple(keys[:2])),  # Tables 1 and 2, whatever the task calls them
        ("Per-site performance", ("sites",)),
        ("Communication", ("communication",)),
        ("Wall time", ("timing",)),
        ("Statistical comparisons", ("comparisons",)),
    )
    for heading, section in headings:
        out += [f"## {heading}", ""]
        for key in section:
            out += [render_table(tables[key]), ""]
        if heading == "Performance" and study.segmentation:
            out += _overlays(study)
    if study.decentral.enabled:
        out += decentral_markdown(study, render_table, escape_md)
    if study.privacy.enabled:
        out += ["## Privacy", ""]
        out += [x for t in privacy_tables(study).values() for x in (render_table(t), "")]
        out += [f"_{escape_md(PRIVACY_NOTE)}_", ""]
    return "\n".join(out).rstrip() + "\n"
