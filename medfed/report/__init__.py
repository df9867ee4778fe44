"""The human-readable end of ``medfed study``: ``report.html`` for readers, ``report.md`` for diffs.

Regenerating a report needs only the study directory (``python -m medfed.report DIR``), so a
wording or layout fix never costs a retraining.
"""

from __future__ import annotations

from pathlib import Path

from medfed.report.html import render_html
from medfed.report.load import Study, load_study
from medfed.report.markdown import render_markdown

__all__ = ["Study", "load_study", "write_report"]

HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"


def write_report(study_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``study_dir`` and return their paths.

    Both are rendered before either is written, so a bad input leaves no half-updated pair.
    Raises ``ValueError`` naming the file and field when an input is missing or malformed.
    """
    study_dir = Path(study_dir)
    study = load_study(study_dir)
    html_text = render_html(study)
    md_text = render_markdown(study)
    html_path = study_dir / HTML_NAME
    md_path = study_dir / MARKDOWN_NAME
    html_path.write_text(html_text, encoding="utf-8")
    md_path.write_text(md_text, encoding="utf-8")
    return html_path, md_path
