"""Number formatting and the "what this means" prose, shared by the HTML and Markdown reports.

One formatter for both outputs so a number a clinician reads in the HTML is, character for
character, the number in the Markdown. Proportions are percentages with one decimal; scores (AUC,
F1, Dice, Jaccard) keep three decimals, which is where the differences the study is about live;
distances (HD95, in pixels) keep one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime

from medfed.report.load import (
    CENTRALIZED,
    CI,
    EXTERNAL,
    FEDERATED,
    INTERNAL,
    LOCAL_PREFIX,
    SITE_PREFIX,
    Study,
)
from medfed.report.privacy import ParadigmCost
from medfed.types import Paradigm

DASH = "—"
ALPHA = 0.05
"""Significance level for every test (DeLong, Wilcoxon) the report words as (not) significant."""
EQUIVALENCE_MARGIN = 0.03
"""|federated − centralized| AUC (or Dice) the project treats as clinically negligible."""
SCORES = frozenset({"auc", "f1", "dice", "jaccard", "mean_image_dice"})
DISTANCES = frozenset({"hd95"})
METRIC_LABELS = {
    "auc": "AUC",
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "dice": "Dice",
    "jaccard": "Jaccard",
    "pixel_acc": "Pixel accuracy",
    "mean_image_dice": "Mean per-image Dice",
    "hd95": "HD95 (px)",
}
DP_MODES = {
    "local": "client-level local DP",
    "central": "client-level central DP",
    "dpsgd": "sample-level DP-SGD",
}


def _missing(x: float | None) -> bool:
    return x is None or math.isnan(x)


def fmt_score(x: float | None) -> str:
    return DASH if x is None or math.isnan(x) else f"{x:.3f}"


def fmt_pct(x: float | None) -> str:
    return DASH if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def fmt_metric(metric: str, x: float | None) -> str:
    if metric in DISTANCES:
        return DASH if x is None or math.isnan(x) else f"{x:.1f}"
    return fmt_score(x) if metric in SCORES else fmt_pct(x)


def fmt_ci(metric: str, ci: CI | None) -> str:
    """``[lo–hi]``, or nothing: a half-known interval would read as a real one."""
    if ci is None or _missing(ci[0]) or _missing(ci[1]):
        return ""
    lo, hi = ci
    assert lo is not None and hi is not None
    if metric in SCORES:
        return f"[{lo:.3f}–{hi:.3f}]"
    if metric in DISTANCES:
        return f"[{lo:.1f}–{hi:.1f}]"
    return f"[{100 * lo:.1f}–{100 * hi:.1f}]"


def fmt_diff(x: float | None) -> str:
    if x is None or math.isnan(x):
        return DASH
    return f"{'−' if x < 0 else '+'}{abs(x):.3f}"


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_phrase(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "p not available"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def fmt_int(x: int | float | None) -> str:
    return DASH if x is None or math.isnan(x) else f"{round(x):,}"


def fmt_seconds(x: float | None) -> str:
    return DASH if x is None or math.isnan(x) else f"{x:,.1f}"


def fmt_bytes(n: float | None) -> str:
    """Decimal units (1 MB = 10⁶ bytes), as network links are sold."""
    if n is None or math.isnan(n):
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def fmt_epsilon(x: float | None) -> str:
    """ε with two decimals (7.99 reached of a budget of 8.00): enough to see a budget was not
    exceeded, no more than an accountant's bound deserves."""
    if x is None or math.isnan(x):
        return DASH
    return "∞" if math.isinf(x) else (f"{x:,.0f}" if x >= 100 else f"{x:.2f}")


def fmt_delta(x: float | None) -> str:
    """δ as it is written in papers: ``1e-5``, not ``1e-05``."""
    if x is None or math.isnan(x):
        return DASH
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.3g}")


def fmt_sigma(per_site: Mapping[str, float]) -> str:
    """σ of a run: one number, or the range when each site calibrated its own (DP-SGD)."""
    if not per_site:
        return DASH
    lo, hi = min(per_site.values()), max(per_site.values())
    return f"{lo:.3g}" if math.isclose(lo, hi, rel_tol=1e-3) else f"{lo:.3g}–{hi:.3g}"


def training_label(study: Study, network: str, paradigm: str) -> str:
    """The paradigm, with the ε it spent when ``network`` trained with DP."""
    info = study.privacy.of(network)
    spent = info.spent.get(paradigm) if info is not None else None
    if spent is None:
        return paradigm_label(paradigm)
    return f"{paradigm_label(paradigm)} (ε = {fmt_epsilon(spent.epsilon)})"


def paradigm_label(paradigm: str) -> str:
    if paradigm.startswith(LOCAL_PREFIX):
        return f"Local ({paradigm.removeprefix(LOCAL_PREFIX)})"
    return "One-shot" if paradigm == str(Paradigm.ONE_SHOT) else paradigm.capitalize()


HANDED_OVER = {
    str(Paradigm.CYCLIC): "consensus",
    str(Paradigm.GOSSIP): "consensus",
    str(Paradigm.ONE_SHOT): "student",
}
"""The one model a paradigm without a training server hands over: the average of the site
models (peer-to-peer) or the model distilled from them (one-shot)."""


def handed_over_label(paradigm: str) -> str:
    """``Gossip (consensus)``: names which of a peer run's many models a column shows."""
    return f"{paradigm_label(paradigm)} ({HANDED_OVER[paradigm]})"


def split_label(split: str) -> str:
    if split.startswith(SITE_PREFIX):
        return split.removeprefix(SITE_PREFIX)
    return {INTERNAL: "Internal validation", EXTERNAL: "External validation"}.get(split, split)


def verdict(difference: float | None, p: float | None) -> str:
    """Words for a two-sided test: a difference is only called higher/lower when significant."""
    if _missing(p) or _missing(difference):
        return "not tested"
    assert p is not None and difference is not None
    if p >= ALPHA:
        return "no significant difference"
    return "significantly higher" if difference > 0 else "significantly lower"


def within_margin(difference: float | None) -> bool | None:
    if difference is None or math.isnan(difference):
        return None
    return round(abs(difference), 12) <= EQUIVALENCE_MARGIN


def _headline_ci(study: Study, network: str, paradigm: str, split: str) -> str:
    m = study.metrics(network, paradigm, split)
    ci = fmt_ci(study.headline, m.ci(study.headline))
    return f"{fmt_score(m.value(study.headline))} {ci}".rstrip()


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else None


def _versus_locals(study: Study, network: str, split: str) -> str:
    """Federated vs the average site-alone model, then how many locals it significantly beats."""
    locals_ = study.meta.locals
    fed = study.metrics(network, FEDERATED, split).value(study.headline)
    mean_local = _mean([study.metrics(network, p, split).value(study.headline) for p in locals_])
    if fed is None or mean_local is None:
        return ""
    a, b = round(fed, 3), round(mean_local, 3)  # compare what the reader sees
    word = "beats" if a > b else ("trails" if a < b else "matches")
    text = (
        f"federated ({fmt_score(fed)}) {word} the mean local-only model ({fmt_score(mean_local)})"
    )
    tests = [study.comparison(network, split, FEDERATED, p) for p in locals_]
    done = [c for c in tests if c is not None and not _missing(c.p_value)]
    if done:
        better = sum(1 for c in done if verdict(c.difference, c.p_value) == "significantly higher")
        worse = sum(1 for c in done if verdict(c.difference, c.p_value) == "significantly lower")
        if better:
            text += f"; it is significantly better than {better} of {len(done)} local models"
        else:
            text += f"; it is not significantly better than any of the {len(done)} local models"
        if worse:
            text += f" and significantly worse than {worse}"
    return text


def _own_sites(study: Study, network: str) -> str:
    """At each site, federated vs the model that site could have trained alone, on its own data."""
    wins, ties, compared = 0, 0, 0
    for site in study.meta.sites:
        local = LOCAL_PREFIX + site
        if local not in study.meta.paradigms:
            continue
        split = SITE_PREFIX + site
        fed = study.metrics(network, FEDERATED, split).value(study.headline)
        own = study.metrics(network, local, split).value(study.headline)
        if fed is None or own is None:
            continue
        compared += 1
        wins += round(fed, 3) > round(own, 3)  # as printed: a 0.0004 edge is not a win
        ties += round(fed, 3) == round(own, 3)
    if not compared:
        return ""
    tied = f" (tied at {ties})" if ties else ""
    return (
        f"On each site's own validation split, the federated model has a higher "
        f"{METRIC_LABELS[study.headline]} than that site's local model at {wins} of {compared} "
        f"sites{tied}."
    )


def _margin_sentence(margins: list[tuple[bool, str]], metric: str) -> str:
    """Whether the point difference sits within the equivalence margin, split by split."""
    word = {True: "within", False: "outside"}
    first_in, first_where = margins[0]
    text = (
        f"The federated model is {word[first_in]} {EQUIVALENCE_MARGIN:.2f} "
        f"{METRIC_LABELS[metric]} of centralized"
    )
    if len(margins) == 1:
        return f"{text} {first_where}."
    if all(inside == first_in for inside, _ in margins):
        return f"{text} both {first_where} and " + " and ".join(w for _, w in margins[1:]) + "."
    rest = " and ".join(f"{word[i]} it {w}" for i, w in margins[1:])
    return f"{text} {first_where}, but {rest}."


def fmt_date(created: str) -> str:
    try:
        return datetime.fromisoformat(created).strftime("%d %B %Y, %H:%M %Z").strip()
    except ValueError:
        return created


def _versus_central(study: Study, net: str) -> list[str]:
    """Federated vs centralized per pooled split, then the equivalence-margin sentence."""
    parts, margins = [], []
    # The Wilcoxon test compares mean per-image Dice, not the pooled Dice quoted before it: say so,
    # or a reader subtracting the two quoted numbers finds a different difference.
    difference = "difference in mean per-image Dice" if study.segmentation else "difference"
    for split in study.meta.splits:
        c = study.comparison(net, split, FEDERATED, CENTRALIZED)
        diff = c.difference if c is not None else None
        p = c.p_value if c is not None else None
        fed = _headline_ci(study, net, FEDERATED, split)
        cen = _headline_ci(study, net, CENTRALIZED, split)
        if split == INTERNAL:
            where = "on internal validation"
            lead = f"Federated {METRIC_LABELS[study.headline]} {fed} vs centralized {cen} {where}"
        else:
            where = f"on the external site ({study.meta.external_site})"
            lead = f"On the external site ({study.meta.external_site}): {fed} vs {cen}"
        parts.append(f"{lead} ({difference} {fmt_diff(diff)}): {verdict(diff, p)} ({p_phrase(p)}).")
        inside = within_margin(diff)
        if inside is not None:
            margins.append((inside, where))
    if margins:
        parts.append(_margin_sentence(margins, study.headline))
    return parts


def _effect(drop: float | None, metric: str) -> str:
    label = METRIC_LABELS[metric]
    if drop is None or round(drop, 3) == 0:
        return f"left {label} unchanged"
    amount = fmt_metric(metric, abs(drop)).replace("%", " percentage points")
    return f"{'cost' if drop > 0 else 'gained'} {amount} {label}"


def _relative(relative: float | None) -> str:
    if relative is None or round(relative, 1) == 0:
        return ""
    return f"; {abs(relative):.1f}% {'lower' if relative > 0 else 'higher'}"


def _cost_sentence(study: Study, twin: str, pc: ParadigmCost) -> str | None:
    """One pooled paradigm's cost of DP in the headline metric, internal then external."""
    metric = study.headline
    internal = pc.splits.get(INTERNAL, {}).get(metric)
    if pc.paradigm.startswith(LOCAL_PREFIX) or internal is None:
        return None  # local-only models are in the table; five of them would drown the point
    text = (
        f"Training {twin} {paradigm_label(pc.paradigm).lower()} with "
        f"{DP_MODES.get(pc.mode or '', pc.mode or 'DP')} "
        f"(ε = {fmt_epsilon(pc.epsilon)} at δ = {fmt_delta(pc.delta)}) "
        f"{_effect(internal.drop, metric)} on internal validation "
        f"({fmt_metric(metric, internal.without_dp)} without DP, "
        f"{fmt_metric(metric, internal.with_dp)} with{_relative(internal.relative_pct)})"
    )
    external = pc.splits.get(EXTERNAL, {}).get(metric)
    if external is not None and external.drop is not None:
        text += (
            f" and {_effect(external.drop, metric)} on external validation "
            f"({study.meta.external_site}: {fmt_metric(metric, external.without_dp)} without DP, "
            f"{fmt_metric(metric, external.with_dp)} with{_relative(external.relative_pct)})"
        )
    return text + "."


def privacy_sentences(study: Study, network: str) -> list[str]:
    """What DP cost ``network`` against its twin (the same model without DP), in words; for a
    twin, which DP network it is the reference of."""
    info = study.privacy.of(network)
    if info is None:
        return [
            f"Trained without DP as the reference for {c.network} (the same model with DP)."
            for c in study.privacy.costs
            if c.twin == network
        ]
    cost = study.privacy.cost(network)
    out = []
    if cost is not None:
        out = [x for pc in cost.paradigms if (x := _cost_sentence(study, cost.twin, pc))]
    else:
        reached = ", ".join(
            f"{paradigm_label(p).lower()} ε = {fmt_epsilon(s.epsilon)} at δ = {fmt_delta(s.delta)}"
            for p, s in info.spent.items()
            if s is not None and not p.startswith(LOCAL_PREFIX)
        )
        out.append(
            f"Trained with {DP_MODES.get(info.mode or '', info.mode or 'DP')}"
            + (f" ({reached})" if reached else "")
            + "; no network in this study trains the same model without DP, so what DP cost "
            "is not measured."
        )
    for paradigm, why in info.stopped.items():
        out.append(f"The {paradigm_label(paradigm).lower()} run stopped early: {why}.")
    return out


def narrative(study: Study) -> list[tuple[str, str]]:
    """Per network, ``(name, paragraph)``: plain, unescaped sentences built from the numbers."""
    # lazy: the peer-to-peer view builds on this module's formatters
    from medfed.report.decentral_view import decentral_sentences

    out = []
    for net in study.meta.networks:
        private = privacy_sentences(study, net)
        # a paragraph of its own: what the models without a training server add
        decentral = decentral_sentences(study, net)
        tail = [(f"{net}, peer-to-peer and one-shot", " ".join(decentral))] if decentral else []
        if not study.has(FEDERATED):
            parts = ["This study trained no federated model; see the tables below.", *private]
            out.append((net, " ".join(parts)))
            out += tail
            continue
        parts = _versus_central(study, net) if study.has(CENTRALIZED) else []
        for split in study.meta.splits:
            if t := _versus_locals(study, net, split):
                where = "internal validation" if split == INTERNAL else "the external site"
                parts.append(f"On {where}, {t}.")
        if own := _own_sites(study, net):
            parts.append(own)
        parts += private
        out.append((net, " ".join(parts) or "No comparison is available for this network."))
        out += tail
    return out


def method_note(study: Study) -> str:
    """The caveats a reader needs before trusting any number below."""
    m = study.meta
    boot = m.bootstrap
    if study.segmentation:
        return (
            f"Dice and Jaccard are pooled over every pixel of a split (foreground class); "
            f"differences are federated minus centralized mean per-image Dice, with p-values from "
            f"the Wilcoxon signed-rank test on per-image Dice paired on the same images (two-sided, "
            f"α = {ALPHA:g}). “Within {EQUIVALENCE_MARGIN:.2f} Dice” compares that difference with "
            f"the project's equivalence margin; it is not a formal equivalence test. Intervals are "
            f"{boot.level:.0%} percentile bootstrap intervals over images ({boot.n_resamples:,} "
            f"resamples, seed {boot.seed})."
        )
    return (
        f"Differences are federated minus centralized AUC; p-values are from DeLong's test for "
        f"correlated ROC curves (two-sided, α = {ALPHA:g}). “Within {EQUIVALENCE_MARGIN:.2f} AUC” "
        f"compares the point estimate with the project's equivalence margin; it is not a formal "
        f"equivalence test. Intervals are {boot.level:.0%} confidence intervals; those of the "
        f"operating-point metrics come from {boot.n_resamples:,} bootstrap resamples (seed "
        f"{boot.seed}). Decision threshold: "
        f"{m.threshold_rule}."
    )


def overlay_columns(study: Study) -> str:
    """The columns of an overlay figure: the study draws the federated and centralized models it
    trained, in that order."""
    shown = [f"{p} prediction" for p in (FEDERATED, CENTRALIZED) if study.has(p)]
    return ", ".join(["image", "ground truth", *shown])


def budget_sentence(study: Study) -> str:
    b = study.meta.budget
    total = b.train_images * b.pooled_epochs
    sentence = (
        f"Every paradigm saw {fmt_int(total)} training images = {b.pooled_epochs:g} pooled epochs "
        f"of the {b.train_images:,} pooled training images (federated: {b.rounds} rounds)."
    )
    pre = b.pretrain
    if pre is None:
        return sentence
    key, name = ("dice", "Dice") if study.meta.segmentation else ("auc", "AUC")
    parts = []
    for model, images in pre.train_images.items():
        score = pre.val.get(model, {}).get(key)
        shown = "" if score is None else f", its validation {name} {score:.3f}"
        parts.append(f"{model}: {fmt_int(images)} images{shown}")
    done = "; ".join(parts)
    return (
        f"{sentence} Before that, every network started from weights pretrained centrally on "
        f"public data ({pre.source}, {pre.epochs} epochs; {done}), the same weights with and "
        "without privacy; the privacy budget covers the private data only."
    )
