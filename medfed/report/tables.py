"""The report's tables as plain data, rendered by both the HTML and the Markdown writer.

Building each table once is what keeps the two reports from drifting apart: a row that exists
in one exists in the other, with the same text. Cells hold unescaped text; the renderers escape.

A segmentation study gets the same six tables in the same places, with Dice in the role of AUC
and Wilcoxon tests on per-image Dice in the role of DeLong tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from medfed.report.load import (
    CENTRALIZED,
    DECENTRAL,
    EXTERNAL,
    FEDERATED,
    INTERNAL,
    LOCAL_PREFIX,
    SITE_PREFIX,
    Comparison,
    Study,
)
from medfed.report.text import (
    DASH,
    METRIC_LABELS,
    fmt_bytes,
    fmt_ci,
    fmt_diff,
    fmt_int,
    fmt_metric,
    fmt_p,
    fmt_score,
    fmt_seconds,
    handed_over_label,
    paradigm_label,
    split_label,
    training_label,
    verdict,
)


@dataclass(frozen=True)
class Cell:
    text: str
    ci: str = ""


@dataclass(frozen=True)
class Group:
    """A column group (e.g. "Internal validation"); ``short`` prefixes Markdown column names."""

    label: str
    short: str
    span: int


@dataclass(frozen=True)
class Row:
    cells: tuple[Cell, ...]
    detail: bool = False
    """An indented breakdown of the row above it (one local site of "Local (all sites)")."""
    highlight: bool = False
    """The federated model: the row the study is about."""


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    groups: tuple[Group, ...] = ()
    """Groups cover the columns after the ``lead`` row-label columns."""
    lead: int = 0
    note: str = ""
    merge_lead: bool = False
    """Show a repeated first cell once (HTML rowspan), as a paper groups rows by network."""
    text_columns: tuple[int, ...] = ()
    """Left-aligned columns besides the lead ones: words read left to right, numbers align right."""

    def is_text(self, column: int) -> bool:
        return column < max(self.lead, 1) or column in self.text_columns


def _metric_cell(study: Study, network: str, paradigm: str, split: str, metric: str) -> Cell:
    m = study.metrics(network, paradigm, split)
    return Cell(fmt_metric(metric, m.value(metric)), fmt_ci(metric, m.ci(metric)))


def _size(study: Study, n: int, n_pos: int | None) -> str:
    return f"{n:,} images" if study.segmentation or n_pos is None else f"{n:,}, {n_pos:,} malignant"


def _split_group(study: Study, split: str, span: int) -> Group:
    """The group header names n and positives when every model was scored on the same cases."""
    seen = {
        (m.n, m.n_pos)
        for net in study.meta.networks
        for by_split in study.results[net].values()
        if (m := by_split.get(split)) is not None
    }
    label = split_label(split)
    if split == EXTERNAL and study.meta.external_site:
        label += f" ({study.meta.external_site})"
    if len(seen) == 1:
        n, n_pos = next(iter(seen))
        label += f" · n = {_size(study, n, n_pos)}"
    return Group(label, "Internal" if split == INTERNAL else "External", span)


def _by_model(study: Study, *, key: str, title: str, metrics: tuple[str, ...], note: str) -> Table:
    splits = study.meta.splits
    rows = tuple(
        Row(
            (
                Cell(net),
                Cell(training_label(study, net, p)),
                *(_metric_cell(study, net, p, s, m) for s in splits for m in metrics),
            ),
            highlight=p == FEDERATED,
        )
        for net in study.meta.networks
        for p in study.meta.paradigms
    )
    columns = tuple(
        f"{METRIC_LABELS[m]} [95% CI]"
        if m in ("auc", "f1") or study.segmentation
        else METRIC_LABELS[m]
        for _ in splits
        for m in metrics
    )
    if study.privacy.enabled:
        note += " ε: privacy spent by a DP network's most-exposed site (see Privacy)."
    return Table(
        key=key,
        title=title,
        columns=("Network", "Training", *columns),
        rows=rows,
        groups=tuple(_split_group(study, s, len(metrics)) for s in splits),
        lead=2,
        note=note,
        merge_lead=True,
    )


def study_table(study: Study) -> Table:
    return _by_model(
        study,
        key="study",
        title="Table 1. Discrimination and operating-point performance",
        metrics=("auc", "accuracy", "sensitivity", "specificity"),
        note=(
            "AUC with its 95% CI in brackets; accuracy, sensitivity and specificity in % at the "
            "fixed threshold, with 95% CI. Local (siteK): trained on siteK's data alone."
        ),
    )


def predictive_table(study: Study) -> Table:
    return _by_model(
        study,
        key="predictive",
        title="Table 2. Predictive values and F1",
        metrics=("ppv", "npv", "f1"),
        note=f"PPV/NPV in %, F1 as a score; {DASH} where undefined (e.g. no predicted positives).",
    )


def segmentation_tables(study: Study) -> tuple[Table, Table]:
    """Tables 1 and 2 of a segmentation study: pooled overlap, then per-image Dice (and HD95)."""
    per_image: tuple[str, ...] = ("mean_image_dice",)
    hd95 = any(
        m.value("hd95") is not None
        for by_p in study.results.values()
        for by_split in by_p.values()
        for m in by_split.values()
    )
    if hd95:
        per_image += ("hd95",)
    return _by_model(
        study,
        key="study",
        title="Table 1. Segmentation overlap and pixel accuracy",
        metrics=("dice", "jaccard", "pixel_acc"),
        note=(
            "Dice and Jaccard of the foreground class, pooled over every pixel of the split, "
            "with 95% CI (bootstrap over images); pixel accuracy in %. Local (siteK): trained "
            "on siteK's data alone."
        ),
    ), _by_model(
        study,
        key="per_image",
        title="Table 2. Per-image Dice" + (" and boundary distance" if hd95 else ""),
        metrics=per_image,
        note=(
            "Mean per-image Dice weighs every image equally, where pooled Dice weighs every pixel"
            + (
                "; HD95: 95th-percentile Hausdorff distance in pixels, lower is better."
                if hd95
                else "."
            )
        ),
    )


def site_splits(study: Study) -> tuple[tuple[str, str, str | None], ...]:
    """``(row label, split, local model)`` per row of the per-site table and figure.

    Each site's own validation split, scored by the model that site trained alone; with a
    peer-to-peer or one-shot model in the study also the external site (no local model of its
    own), where the peer-to-peer section scores each site's own model too.
    """
    rows: list[tuple[str, str, str | None]] = [
        (site, SITE_PREFIX + site, LOCAL_PREFIX + site) for site in study.meta.sites
    ]
    ext = study.meta.external_site
    if ext is not None and any(study.has(p) for p in DECENTRAL):
        rows.append((f"{ext} (external)", EXTERNAL, None))
    return tuple(rows)


def site_table(study: Study) -> Table:
    """Per site: centralized, federated, the peer-to-peer and one-shot models the study has, and
    the model that site trained alone, on its own data."""
    nets = study.meta.networks
    metric = study.headline
    decentral = tuple(p for p in DECENTRAL if study.has(p))
    rows = []
    for name, split, own in site_splits(study):
        first = study.metrics(nets[0], study.meta.paradigms[0], split)
        if not first.n:
            size = DASH
        elif study.segmentation:
            size = f"{first.n:,}"
        else:
            size = f"{first.n:,} ({first.n_pos or 0:,})"
        cells = [Cell(name), Cell(size)]
        for net in nets:
            for p in (CENTRALIZED, FEDERATED, *decentral, own):
                if p is not None and p in study.meta.paradigms:
                    cells.append(_metric_cell(study, net, p, split, metric))
                else:
                    cells.append(Cell(DASH))
        rows.append(Row(tuple(cells)))
    per_net = (
        "Centralized",
        "Federated",
        *(handed_over_label(p) for p in decentral),
        "Local (own site)",
    )
    label = METRIC_LABELS[metric]
    note = f"{label} [95% CI]. Local (own site): the model trained at that site alone."
    title = f"Table 3. {label} on each site's own validation split"
    if decentral:
        note += (
            " Consensus (cyclic, gossip): the example-weighted average of the site models; "
            "student (one-shot): the model distilled from them; each is the one model its "
            "paradigm hands over, scored like the others."
        )
    if len(rows) > len(study.meta.sites):
        title += " and on the external site"
        note += " The external site trained no model of its own."
    return Table(
        key="sites",
        title=title,
        columns=(
            "Site",
            "n (images)" if study.segmentation else "n (malignant)",
            *(c for _ in nets for c in per_net),
        ),
        rows=tuple(rows),
        groups=tuple(Group(net, net, len(per_net)) for net in nets),
        lead=2,
        note=note,
    )


def communication_table(study: Study) -> Table:
    rows = []
    for net in study.meta.networks:
        c = study.meta.communication.get(net)
        if c is None:
            continue
        per_round = c.bytes_per_round
        if per_round is None and c.rounds:
            per_round = (c.bytes_up + c.bytes_down) / c.rounds
        rows.append(
            Row(
                (
                    Cell(net),
                    Cell(f"{c.rounds:,}"),
                    Cell(fmt_bytes(per_round)),
                    Cell(fmt_bytes(c.bytes_up)),
                    Cell(fmt_bytes(c.bytes_down)),
                    Cell(fmt_bytes(c.bytes_up + c.bytes_down)),
                )
            )
        )
    return Table(
        key="communication",
        title="Table 4. Communication cost of federated training",
        columns=("Network", "Rounds", "Per round", "Upload total", "Download total", "Total"),
        rows=tuple(rows),
        note=(
            "Bytes of model parameters exchanged, all sites together; 1 MB = 10⁶ bytes."
            if rows
            else "No federated run in this study: nothing was exchanged."
        ),
    )


def _sum(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return sum(known) if known else None


def _timing_row(
    net: str, label: str, seconds: float | None, images: float | None, rate: float | None
) -> Row:
    return Row(
        (
            Cell(net),
            Cell(label),
            Cell(fmt_seconds(seconds)),
            Cell(fmt_int(images)),
            Cell(fmt_int(rate)),
        )
    )


def timing_table(study: Study) -> Table:
    """Local sites are summed first: the question is what local-only training costs in total."""
    rows = []
    for net in study.meta.networks:
        t = study.timing[net]
        for p in (CENTRALIZED, FEDERATED, *DECENTRAL):
            if p in t:
                tp = t[p]
                rows.append(
                    _timing_row(
                        net, paradigm_label(p), tp.seconds, tp.train_images, tp.images_per_s
                    )
                )
        locals_ = study.meta.locals
        if locals_:
            secs = _sum([t[p].seconds for p in locals_])
            imgs = _sum([t[p].train_images for p in locals_])
            rate = imgs / secs if secs and imgs is not None else None
            rows.append(_timing_row(net, "Local (all sites)", secs, imgs, rate))
            for p in locals_:
                tp = t[p]
                r = _timing_row(
                    net, paradigm_label(p), tp.seconds, tp.train_images, tp.images_per_s
                )
                rows.append(Row(r.cells, detail=True))
    return Table(
        key="timing",
        title="Table 5. Training wall time",
        columns=("Network", "Training", "Seconds", "Train images", "Images/s"),
        rows=tuple(rows),
        lead=2,
        merge_lead=True,
        note=(
            f"Device: {study.meta.device}. Local (all sites): the local runs summed, as if run "
            "one after another; the indented rows are the individual sites."
        ),
    )


def comparison_table(study: Study) -> Table:
    """DeLong tests (classification) or Wilcoxon tests on per-image Dice (segmentation): the
    same rows, A vs B on the same cases, with each test's own value columns."""
    order = {n: i for i, n in enumerate(study.meta.networks)}
    seg = study.segmentation

    def values(c: Comparison) -> tuple[Cell, ...]:
        if seg:
            return Cell(fmt_int(c.n)), Cell(fmt_score(c.value_a)), Cell(fmt_score(c.value_b))
        return Cell(fmt_score(c.auc_a)), Cell(fmt_score(c.auc_b))

    rows = tuple(
        Row(
            (
                Cell(c.network),
                Cell(split_label(c.split)),
                Cell(f"{paradigm_label(c.a)} vs {paradigm_label(c.b)}"),
                *values(c),
                Cell(fmt_diff(c.difference)),
                Cell(fmt_p(c.p_value)),
                Cell(verdict(c.difference, c.p_value)),
            )
        )
        for c in sorted(study.comparisons, key=lambda c: order.get(c.network, len(order)))
    )
    value_columns = ("Images", "Mean Dice A", "Mean Dice B") if seg else ("AUC A", "AUC B")
    columns = ("Network", "Split", "A vs B", *value_columns, "Difference", "p", "Result")
    return Table(
        key="comparisons",
        title="Table 6. Wilcoxon signed-rank tests on per-image Dice"
        if seg
        else "Table 6. DeLong tests for correlated ROC curves",
        columns=columns,
        rows=rows,
        lead=1,
        merge_lead=True,
        text_columns=(1, 2, len(columns) - 1),
        note=(
            "Mean per-image Dice of each model on the same images; Difference = A − B; "
            "two-sided, significant at α = 0.05."
            if seg
            else "Difference = AUC A − AUC B; two-sided, significant at α = 0.05."
        ),
    )


def all_tables(study: Study) -> dict[str, Table]:
    """Keyed by ``Table.key``, in report order; the first two keys are the performance tables."""
    performance = (
        segmentation_tables(study)
        if study.segmentation
        else (study_table(study), predictive_table(study))
    )
    tables = (
        *performance,
        site_table(study),
        communication_table(study),
        timing_table(study),
        comparison_table(study),
    )
    return {t.key: t for t in tables}
