"""The report's "Peer-to-peer and one-shot" section as plain data, for both renderers.

Shown only when the study trained cyclic, gossip or one-shot models. The main tables already
score the one model each of them hands over (the consensus, or the distilled student); this
section shows what only these paradigms have: a final model *per site* and how far those models
spread (peer-to-peer), and what one upload per site buys against FedAvg's 2 × R transfers
(one-shot), with the grid of synthesized images that replaced the sites' data in distillation.

It also words those models for "What this means" (:func:`decentral_sentences`): each handed-over
model against FedAvg with the DeLong test the study already ran, the spread of the peer site
models, one-shot against FedAvg after 1 and after R rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from medfed.report.decentral import OneShot, PeerRun, Point
from medfed.report.load import CENTRALIZED, DECENTRAL, EXTERNAL, FEDERATED, INTERNAL, Study
from medfed.report.privacy_view import FIRST_TABLE, privacy_tables
from medfed.report.tables import Cell, Row, Table
from medfed.report.text import (
    DASH,
    HANDED_OVER,
    METRIC_LABELS,
    fmt_bytes,
    fmt_ci,
    fmt_diff,
    fmt_pct,
    fmt_score,
    p_phrase,
    paradigm_label,
    verdict,
)
from medfed.study.decentral import OWN_SITE
from medfed.study.decentral import Row as ShotKey
from medfed.types import Paradigm

DECENTRAL_SECTION = ("decentral", "Peer-to-peer and one-shot")
"""Only for a study with cyclic, gossip or one-shot runs."""
GRID_CAPTION = (
    "images the server synthesized from the site models for one-shot distillation; rows from "
    "random noise (top) to the final images (bottom), columns grouped by class. The images are "
    "synthesized, not taken from any site."
)
PEER_NOTE = (
    "Each site's own final model (peer-to-peer training leaves one per site) scored on the "
    "pooled internal validation, on its own site's validation split and on the external site; "
    "accuracy at each model's own Youden threshold on internal validation, as in Table 1. "
    "Consensus: the example-weighted average of the site models, the model these paradigms "
    "contribute to the tables above. Spread: min–max and mean ± SD (population) over the sites. "
    "Bytes moved: model bytes a site sent plus received between peers."
)
SHOT_NOTE = (
    "Transfers per site: one-shot uploads each site's model once; FedAvg downloads and uploads "
    "once per round (2 × rounds). AUC and accuracy (at 0.5) on pooled internal and external "
    "validation as each run recorded them in its history.jsonl; FedAvg after 1 round is the "
    "study's FedAvg run after its first round, i.e. after 1/R of the training budget. One-shot "
    "chose its distillation epoch on internal validation only. CIs and DeLong tests of the final "
    "models are in Tables 1 and 6."
)


def _pp(x: float) -> str:
    """A difference of proportions in percentage points."""
    return f"{'−' if x < 0 else '+'}{abs(100 * x):.1f} pp"


def _first(study: Study) -> int:
    return FIRST_TABLE + len(privacy_tables(study))


def _pair(p: Point) -> tuple[Cell, Cell]:
    return Cell(fmt_score(p.auc)), Cell(fmt_pct(p.accuracy))


_dashes = (Cell(DASH), Cell(DASH))


def _range(stats: dict[str, float | None] | None, pct: bool) -> tuple[str, str]:
    if stats is None or stats.get("min") is None:
        return DASH, DASH
    f = fmt_pct if pct else fmt_score
    lo, hi, mean, sd = (stats.get(k) for k in ("min", "max", "mean", "std"))
    return f"{f(lo)}–{f(hi)}", f"{f(mean)} ± {f(sd)}"


def _spread_rows(run: PeerRun, splits: tuple[str, ...]) -> tuple[Row, Row]:
    ranges: list[Cell] = []
    means: list[Cell] = []
    for split in splits:
        for metric in ("auc", "accuracy"):
            stats = run.spread.get(split, {}).get(metric)
            r, m = _range(dict(stats) if stats is not None else None, metric == "accuracy")
            ranges.append(Cell(r))
            means.append(Cell(m))
    total = sum(run.bytes_per_site.values()) / max(len(run.bytes_per_site), 1)
    return (
        Row(
            (Cell(paradigm_label(run.paradigm)), Cell("Site models: min–max"), *ranges, Cell(DASH))
        ),
        Row(
            (
                Cell(paradigm_label(run.paradigm)),
                Cell("Site models: mean ± SD"),
                *means,
                Cell(f"{fmt_bytes(total)} (mean)"),
            )
        ),
    )


def peer_tables(study: Study) -> list[Table]:
    """One table per network with peer runs: site models, their spread, the consensus."""
    splits = (INTERNAL, OWN_SITE) + ((EXTERNAL,) if study.meta.external_site else ())
    names = {INTERNAL: "Internal", OWN_SITE: "Own site", EXTERNAL: "External"}
    out: list[Table] = []
    first = _first(study)
    for net in study.meta.networks:
        runs = [r for r in study.decentral.peer if r.network == net]
        if not runs:
            continue
        rows: list[Row] = []
        for run in runs:
            label = paradigm_label(run.paradigm)
            for site, model in run.site_models.items():
                cells = [c for s in splits for c in _pair(model.at(s))]
                moved = fmt_bytes(run.bytes_per_site.get(site))
                rows.append(Row((Cell(label), Cell(site), *cells, Cell(moved)), detail=True))
            rows += _spread_rows(run, splits)
            # the consensus is no site's own model: no own-site column
            cons = [
                c
                for s in splits
                for c in (_pair(run.consensus.at(s)) if s != OWN_SITE else _dashes)
            ]
            rows.append(Row((Cell(label), Cell("Consensus"), *cons, Cell(DASH)), highlight=True))
            diff = [
                Cell(DASH)
                if s == OWN_SITE
                else Cell(fmt_diff(v) if m == "auc" or v is None else _pp(v))
                for s in splits
                for m in ("auc", "accuracy")
                for v in [run.consensus_minus_mean.get(s, {}).get(m)]
            ]
            rows.append(Row((Cell(label), Cell("Consensus − mean of sites"), *diff, Cell(DASH))))
        columns = tuple(f"{names[s]} {m}" for s in splits for m in ("AUC", "accuracy"))
        out.append(
            Table(
                key=f"peer-{len(out) + 1}",
                title=f"Table {first + len(out)}. Peer-to-peer, {net}: each site's own final "
                "model and the consensus",
                columns=("Training", "Model", *columns, "Bytes moved"),
                rows=tuple(rows),
                lead=2,
                merge_lead=True,
                note=PEER_NOTE,
            )
        )
    return out


def _shot_label(study: Study, key: str, row_rounds: int | None) -> str:
    strategy = study.meta.strategy
    if key == ShotKey.ONE_SHOT:
        return "One-shot (FedISCA)"
    if key == ShotKey.FEDERATED_1:
        return f"Federated ({strategy}), 1 round"
    if key == ShotKey.FEDERATED:
        return f"Federated ({strategy}), {row_rounds or DASH} rounds"
    return paradigm_label(CENTRALIZED)


def _transfers(transfers: int | None) -> str:
    return "data pooled" if transfers is None else f"{transfers:,}"


def one_shot_table(study: Study, number: int) -> Table:
    splits = study.meta.splits
    rows: list[Row] = []
    for shot in study.decentral.one_shot:
        for key in ShotKey:
            row = shot.rows.get(str(key))
            if row is None:
                continue
            points = [row.internal] + (
                [row.external or Point(None, None)] if EXTERNAL in splits else []
            )
            cells = [c for p in points for c in _pair(p)]
            rows.append(
                Row(
                    (
                        Cell(shot.network),
                        Cell(_shot_label(study, str(key), row.rounds_done)),
                        Cell(_transfers(row.transfers_per_site)),
                        Cell(DASH if row.bytes_per_site is None else fmt_bytes(row.bytes_per_site)),
                        *cells,
                    ),
                    highlight=key is ShotKey.ONE_SHOT,
                )
            )
    names = {INTERNAL: "Internal", EXTERNAL: "External"}
    return Table(
        key="one-shot",
        title=f"Table {number}. One-shot against FedAvg after 1 and after R rounds, and "
        "centralized",
        columns=(
            "Network",
            "Training",
            "Transfers per site",
            "Bytes per site",
            *(f"{names[s]} {m}" for s in splits for m in ("AUC", "accuracy")),
        ),
        rows=tuple(rows),
        lead=2,
        merge_lead=True,
        note=SHOT_NOTE,
    )


def decentral_tables(study: Study) -> dict[str, Table]:
    """Keyed by ``Table.key``, in report order; empty without peer or one-shot runs."""
    peer = peer_tables(study)
    tables = list(peer)
    if study.decentral.one_shot:
        tables.append(one_shot_table(study, _first(study) + len(peer)))
    return {t.key: t for t in tables}


def one_shot_sentence(study: Study, shot: OneShot) -> str:
    """Transfers and internal AUC of one-shot against its references, in words."""
    parts = []
    for key in ShotKey:
        row = shot.rows.get(str(key))
        if row is None:
            continue
        what = _shot_label(study, str(key), row.rounds_done)
        if row.transfers_per_site is not None:
            n = row.transfers_per_site
            what += f" ({n:,} transfer{'s' if n != 1 else ''} per site)"
        parts.append(f"{what} {fmt_score(row.internal.auc)}")
    if not parts:
        return ""
    return f"{shot.network}, internal validation AUC: {'; '.join(parts)}."


def peer_sentence(run: PeerRun) -> str:
    """How far the site models of one peer run spread, and where the consensus lands."""
    stats = run.spread.get(INTERNAL, {}).get("auc", {})
    lo, hi, mean = stats.get("min"), stats.get("max"), stats.get("mean")
    return (
        f"{run.network}, {paradigm_label(run.paradigm).lower()}: the {len(run.site_models)} site models reach internal "
        f"validation AUC {fmt_score(lo)}–{fmt_score(hi)} (mean {fmt_score(mean)}); their "
        f"consensus {fmt_score(run.consensus.at(INTERNAL).auc)}."
    )


def decentral_markdown(
    study: Study, render: Callable[[Table], str], escape: Callable[[str], str]
) -> list[str]:
    """The section as Markdown lines; the synthesis grids are linked, as PNG files beside it."""
    out = [f"## {DECENTRAL_SECTION[1]}", ""]
    prose = [peer_sentence(r) for r in study.decentral.peer]
    prose += [x for shot in study.decentral.one_shot if (x := one_shot_sentence(study, shot))]
    out += [x for p in prose for x in (escape(p), "")]
    out += [x for t in decentral_tables(study).values() for x in (render(t), "")]
    for shot in study.decentral.one_shot:
        if shot.png is not None and shot.figure is not None:
            alt = escape(f"Images synthesized by one-shot FedISCA for {shot.network}")
            out += [f"![{alt}]({quote(shot.figure)})", ""]
        else:
            out += [f"_{escape(f'{shot.network}: {shot.problem}')}_", ""]
    if study.decentral.one_shot:
        out += [f"_{escape(GRID_CAPTION[0].upper() + GRID_CAPTION[1:])}_", ""]
    return out


# --- "What this means": sentences built from the numbers, for the narrative in text.py ---


def _word(a: float, b: float) -> str:
    """As printed: a 0.0004 edge is no edge."""
    x, y = round(a, 3), round(b, 3)
    return "higher than" if x > y else ("lower than" if x < y else "equal to")


def _with_ci(study: Study, network: str, paradigm: str, split: str) -> str:
    m = study.metrics(network, paradigm, split)
    ci = fmt_ci(study.headline, m.ci(study.headline))
    return f"{fmt_score(m.value(study.headline))} {ci}".rstrip()


def _test(
    study: Study, network: str, paradigm: str, split: str
) -> tuple[str, float | None, float | None] | None:
    """``(reference, paradigm − reference, p)`` of the study's paired test on ``split``: against
    federated (the main comparisons, stored federated − other, so negated), else against
    centralized (the peer/one-shot comparisons)."""
    c = study.comparison(network, split, FEDERATED, paradigm)
    if c is not None:
        return FEDERATED, None if c.difference is None else -c.difference, c.p_value
    c = study.comparison(network, split, paradigm, CENTRALIZED)
    if c is not None:
        return CENTRALIZED, c.difference, c.p_value
    return None


def _versus(study: Study, network: str, paradigm: str, model: str) -> str:
    """The handed-over model against federated (or centralized) on each pooled split, tested."""
    parts = []
    for split in study.meta.splits:
        vs = _with_ci(study, network, paradigm, split)
        result = " (not tested)"
        test = _test(study, network, paradigm, split)
        if test is not None:
            ref, diff, p = test
            name = paradigm_label(ref).lower()
            vs += f" vs {name + ' ' if split == INTERNAL else ''}"
            vs += _with_ci(study, network, ref, split)
            result = f" ({model} − {name} {fmt_diff(diff)}): {verdict(diff, p)} ({p_phrase(p)})"
        if split == INTERNAL:
            parts.append(f"{vs} on internal validation{result}")
        else:
            parts.append(f"on the external site ({study.meta.external_site}): {vs}{result}")
    metric = METRIC_LABELS[study.headline]
    return f"{paradigm_label(paradigm)} {model} {metric} " + "; ".join(parts) + "."


def _spread(run: PeerRun) -> str:
    """Whether averaging the site models helped: the consensus against their range and mean."""
    stats = run.spread.get(INTERNAL, {}).get("auc", {})
    lo, hi, sd = stats.get("min"), stats.get("max"), stats.get("std")
    cons = run.consensus.at(INTERNAL).auc
    if lo is None or hi is None or cons is None:
        return ""
    if round(cons, 3) > round(hi, 3):
        where = "above every site model"
    elif round(cons, 3) < round(lo, 3):
        where = "below every site model"
    else:
        where = "within their range"
    diff = run.consensus_minus_mean.get(INTERNAL, {}).get("auc")
    return (
        f"The {len(run.site_models)} {paradigm_label(run.paradigm).lower()} site models span "
        "internal validation AUC "
        f"{fmt_score(lo)}–{fmt_score(hi)} (SD {fmt_score(sd)}); the consensus ({fmt_score(cons)}) "
        f"lies {where} ({fmt_diff(diff)} against their mean)."
    )


def _transfers_per_site(n: int | None) -> str:
    return "" if n is None else f"{n:,} transfer{'s' if n != 1 else ''} per site"


def _shot_versus_rounds(study: Study, shot: OneShot) -> str:
    """One-shot against FedAvg after 1 and after R rounds, as the runs' histories recorded them."""
    mine = shot.rows.get(str(ShotKey.ONE_SHOT))
    if mine is None or mine.internal.auc is None:
        return ""
    refs: list[str] = []
    for key in (ShotKey.FEDERATED_1, ShotKey.FEDERATED):
        row = shot.rows.get(str(key))
        if row is None or row.internal.auc is None or row.rounds_done is None:
            continue
        r = row.rounds_done
        after = f"after {r} round{'s' if r != 1 else ''}"
        what = f"federated ({study.meta.strategy}) {after}" if not refs else after
        moved = _transfers_per_site(row.transfers_per_site)
        refs.append(
            f"{_word(mine.internal.auc, row.internal.auc)} {what} "
            f"({fmt_score(row.internal.auc)}{'; ' + moved if moved else ''})"
        )
    if not refs:
        return ""
    moved = _transfers_per_site(mine.transfers_per_site)
    return (
        "In the runs' own validation records (not tested for significance), one-shot's internal "
        f"validation AUC {fmt_score(mine.internal.auc)}{f' ({moved})' if moved else ''} is "
        + " and ".join(refs)
        + "."
    )


def decentral_sentences(study: Study, network: str) -> list[str]:
    """What the peer-to-peer and one-shot models of ``network`` mean, in words; empty when the
    study has none. A difference is only called higher or lower when its test says so."""
    out: list[str] = []
    for paradigm in DECENTRAL:
        if not study.has(paradigm):
            continue
        out.append(_versus(study, network, paradigm, HANDED_OVER[paradigm]))
        if paradigm == str(Paradigm.ONE_SHOT):
            shots = study.decentral.one_shot
            more = [_shot_versus_rounds(study, s) for s in shots if s.network == network]
        else:
            more = [
                _spread(r)
                for r in study.decentral.peer
                if (r.network, r.paradigm) == (network, paradigm)
            ]
        out += [x for x in more if x]
    return out
