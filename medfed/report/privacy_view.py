"""The report's Privacy section as plain data: what each DP run spent, and what DP cost.

Shown only when a network trained with DP. Two kinds of table, built once for both renderers
like every other table: the ε each DP run reached (with the settings that produced it), then one
table per DP network against its twin (the same model trained without DP in the same study, on
the same images), metric by metric. A privacy claim is only read correctly with its δ, its
mechanism and its noise, so each row carries them.
"""

from __future__ import annotations

from medfed.report.load import LOCAL_PREFIX, Study
from medfed.report.privacy import Drop
from medfed.report.tables import Cell, Row, Table
from medfed.report.text import (
    DASH,
    DP_MODES,
    METRIC_LABELS,
    SCORES,
    fmt_delta,
    fmt_diff,
    fmt_epsilon,
    fmt_metric,
    fmt_sigma,
    paradigm_label,
    split_label,
)

PRIVACY_NOTE = (
    "(ε, δ)-differential privacy: anything computed from a DP model changes by at most a factor "
    "e^ε in probability (plus δ) when one protected unit is added or removed: one patient image "
    "for DP-SGD, a whole site's data for client-level DP. Smaller ε is stronger; ε ≤ 1 is strong, "
    "ε around 8 is common in published medical imaging work. ε is accounted by the run itself, "
    "over every round it trained."
)
FIRST_TABLE = 7
"""Tables 1-6 are the study's; the privacy tables continue the numbering."""


def _mode(mode: str | None) -> str:
    return DP_MODES.get(mode or "", mode or DASH)


def _clip(clip: float | None) -> str:
    return DASH if clip is None else f"{clip:.3g}"


def _order(study: Study, keys: list[str]) -> list[str]:
    """Paradigm keys in the study's order, unknown ones after."""
    known = [p for p in study.meta.paradigms if p in keys]
    return known + [k for k in keys if k not in known]


def spent_table(study: Study) -> Table:
    """Per DP network and run: the mechanism, the ε reached at δ, the budget, σ and C."""
    rows = []
    for net in study.meta.networks:
        info = study.privacy.of(net)
        if info is None:
            continue
        budget = fmt_epsilon(info.budget) if info.budget is not None else "none"
        for paradigm in _order(study, list(info.spent)):
            spent = info.spent[paradigm]
            stopped = info.stopped.get(paradigm, "")
            cells = (
                (
                    Cell(net),
                    Cell(paradigm_label(paradigm)),
                    *(Cell(DASH),) * 7,
                    Cell(stopped or DASH),
                )
                if spent is None
                else (
                    Cell(net),
                    Cell(paradigm_label(paradigm)),
                    Cell(_mode(spent.mode)),
                    Cell(fmt_epsilon(spent.epsilon)),
                    Cell(fmt_delta(spent.delta)),
                    Cell(budget),
                    Cell(spent.accountant.upper()),
                    Cell(fmt_sigma(spent.noise_multiplier)),
                    Cell(_clip(spent.clip)),
                    Cell(stopped or "completed"),
                )
            )
            rows.append(Row(cells, detail=paradigm.startswith(LOCAL_PREFIX)))
    return Table(
        key="privacy",
        title=f"Table {FIRST_TABLE}. Differential privacy spent by each run",
        columns=(
            "Network",
            "Training",
            "Mechanism",
            "ε reached",
            "δ",
            "ε budget",
            "Accountant",
            "σ",
            "C",
            "Run",
        ),
        rows=tuple(rows),
        lead=2,
        merge_lead=True,
        text_columns=(2, 6, 9),
        note=(
            "ε reached: the largest ε of any site after the last round ((ε, δ)-DP, from the "
            "run's own accountant); the guarantee is the most-exposed site's. σ: noise "
            "multiplier (a range when each site calibrated its own); C: clipping bound (per "
            "example for DP-SGD, per update for client-level DP)."
        ),
    )


def _drop_text(metric: str, d: Drop) -> tuple[str, str]:
    """Absolute drop (a score difference, or percentage points) and relative drop in %."""
    if d.drop is None:
        absolute = DASH
    elif metric in SCORES:
        absolute = fmt_diff(d.drop)
    else:
        absolute = f"{'−' if d.drop < 0 else '+'}{abs(100 * d.drop):.1f} pp"
    relative = DASH if d.relative_pct is None else f"{d.relative_pct:.1f}%"
    return absolute, relative


def cost_tables(study: Study) -> list[Table]:
    """One table per DP network with a twin; pooled splits only (per-site in results.json)."""
    out = []
    for i, cost in enumerate(study.privacy.costs):
        rows = []
        for pc in cost.paradigms:
            guarantee = f"{fmt_epsilon(pc.epsilon)} ({fmt_delta(pc.delta)})"
            for split in study.meta.splits:
                by_metric = pc.splits.get(split)
                if by_metric is None:
                    continue
                # Local-only models: the headline metric only, or five sites bury the rest.
                local = pc.paradigm.startswith(LOCAL_PREFIX)
                for metric in (study.headline,) if local else cost.metrics:
                    d = by_metric.get(metric)
                    if d is None:
                        continue
                    absolute, relative = _drop_text(metric, d)
                    cells = (
                        Cell(paradigm_label(pc.paradigm)),
                        Cell(split_label(split)),
                        Cell(METRIC_LABELS.get(metric, metric)),
                        Cell(fmt_metric(metric, d.without_dp)),
                        Cell(fmt_metric(metric, d.with_dp)),
                        Cell(absolute),
                        Cell(relative),
                        Cell(guarantee),
                        Cell(_mode(pc.mode)),
                        Cell(fmt_sigma(pc.noise_multiplier)),
                        Cell(_clip(pc.clip)),
                    )
                    rows.append(Row(cells, highlight=metric == study.headline))
        out.append(
            Table(
                key=f"privacy-cost-{i + 1}",
                title=f"Table {FIRST_TABLE + 1 + i}. What DP cost {cost.network}: against "
                f"{cost.twin}, the same model without DP",
                columns=(
                    "Training",
                    "Split",
                    "Metric",
                    "Without DP",
                    "With DP",
                    "Drop",
                    "Drop (%)",
                    "ε (δ) reached",
                    "Mechanism",
                    "σ",
                    "C",
                ),
                rows=tuple(rows),
                lead=1,
                merge_lead=True,
                text_columns=(1, 2, 8),
                note=(
                    f"Without DP: {cost.twin}; with DP: {cost.network}; same data, seed and "
                    "budget. Drop = without − with (positive: DP cost that much; pp: percentage "
                    "points), relative to the value without DP. Point estimates; their CIs are "
                    "in the performance tables. Local-only models: "
                    f"{METRIC_LABELS[study.headline]} only; every metric and site is in "
                    "results.json (privacy)."
                ),
            )
        )
    return out


def privacy_tables(study: Study) -> dict[str, Table]:
    """Keyed by ``Table.key``, in report order; empty when no network trained with DP."""
    if not study.privacy.enabled:
        return {}
    return {t.key: t for t in (spent_table(study), *cost_tables(study))}
