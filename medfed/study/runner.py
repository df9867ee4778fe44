"""``medfed study``: train every network centralized, federated and local-only, then score and
compare them on the same cases.

Each (network, paradigm) is an ordinary engine run in ``DIR/runs/<network>/<paradigm>/`` with its
own checkpoints, so a study that dies resumes where it stopped: finished runs are skipped (their
``summary.json`` carries the config hash), an interrupted run continues from its last round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import nn

from medfed.algorithms import STRATEGIES, FederationContext
from medfed.algorithms.base import load_params
from medfed.checkpoint import load_latest
from medfed.client.train import predict_masks, predict_proba, resolve_device
from medfed.config import RunConfig, changed_settings, config_dict, config_hash
from medfed.data.site import ArrayDataset, Federation, Site
from medfed.engine import build_model, load_federation
from medfed.study import decentral, runs
from medfed.study import segmentation as seg
from medfed.study.config import (
    DECENTRAL_PARADIGMS,
    DERIVED_TRAIN_OPTIONS,
    NetworkSpec,
    StudyConfig,
    load_study_config,
)
from medfed.study.overlays import Example, pick_examples, write_overlays
from medfed.study.pretrain import pretrain_meta, warm_start
from medfed.study.privacy import privacy_cost, privacy_meta
from medfed.study.stats import (
    ModelKey,
    Split,
    SplitScores,
    local_key,
    study_results,
    write_predictions,
)
from medfed.types import Paradigm, Params, Task

T = TypeVar("T")
THRESHOLD_RULE = (
    "Youden's J on the pooled internal validation split, applied unchanged to every other split"
)


class StudyError(RuntimeError):
    """The study cannot go on as configured (e.g. its folder holds a different study)."""


@dataclass(frozen=True)
class StudyResult:
    out_dir: Path
    results: dict[str, Any]
    report_html: Path | None
    report_md: Path | None


@dataclass(frozen=True)
class _Trained:
    """A finished run, as the models each site would use."""

    global_params: Params
    for_site: Callable[[str], Params]


def _medfed_version() -> str:
    try:
        return version("medfed")
    except PackageNotFoundError:
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def _claim_dir(out_dir: Path, config: StudyConfig) -> None:
    """A study folder belongs to one config; resuming with another would mix results."""
    marker = out_dir / "study.yaml"
    if marker.exists():
        previous = load_study_config(marker)
        if config_hash(previous) != config_hash(config):
            shown = changed_settings(config_dict(previous), config_dict(config))
            raise StudyError(
                f"{out_dir} holds a study with config {config_hash(previous)}, not "
                f"{config_hash(config)} (changed since its {marker.name}: {shown}); choose "
                "another --out (or delete the folder)"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    # Without the derived train options, so the file loads back as the same study.
    body = config.model_dump(mode="json", exclude={"train": set(DERIVED_TRAIN_OPTIONS)})
    marker.write_text(
        f"# medfed resolved study config; hash {config_hash(config)}\n"
        + yaml.safe_dump(body, sort_keys=False)
    )


def _run_dir(out_dir: Path, network: NetworkSpec, paradigm: Paradigm) -> Path:
    return out_dir / "runs" / network.slug / str(paradigm)


def _trained(
    run_cfg: RunConfig, run_dir: Path, model: nn.Module, sites: tuple[str, ...]
) -> _Trained:
    if run_cfg.paradigm in DECENTRAL_PARADIGMS:  # every site scores with the one model handed over
        return _fixed(_run_file(runs.final_params, run_dir))
    ckpt = load_latest(run_dir)
    if ckpt is None:
        raise StudyError(f"{run_dir}: no checkpoint; the run did not complete a round")
    if run_cfg.paradigm is Paradigm.FEDERATED:
        strategy = STRATEGIES.create(
            run_cfg.federation.strategy.name, run_cfg.federation.strategy.options
        )
    else:
        strategy = STRATEGIES.create("fedavg", {})
    strategy.init(ckpt.global_params, context=FederationContext(model=model, sites=sites))
    g, states = ckpt.global_params, ckpt.client_states
    # Personalised algorithms (FedBN) score each site's cases with that site's own model.
    return _Trained(g, lambda site: strategy.personalize(g, states.get(site, {})))


def _run_file(read: Callable[[Path], T], run_dir: Path) -> T:
    try:
        return read(run_dir)
    except runs.RunFilesError as err:
        raise StudyError(str(err)) from None


def _fixed(params: Params) -> _Trained:
    """Every site (and the external one) scored with the same ``params``."""
    return _Trained(params, lambda _site: params)


def _case_ids(site: Site, data: ArrayDataset) -> tuple[str, ...]:
    return data.case_ids or tuple(f"{site.name}-{i:05d}" for i in range(len(data)))


def _score_segmentation(
    model: nn.Module,
    trained: _Trained,
    fed: Federation,
    config: RunConfig,
    device: torch.device,
    *,
    hd95: bool,
) -> dict[Split, seg.SegScores]:
    """Per-image confusion counts (and HD95) of every validation image; masks never kept."""
    from medfed.metrics.segmentation import confusion_counts
    from medfed.metrics.segmentation import hd95 as hd95_of

    num_classes = fed.num_outputs(Task.SEGMENTATION)

    def scores(site: Site, params: Params) -> seg.SegScores:
        load_params(model, params, device)
        pred = _masks(model, site.val, config, device)
        truth = site.val.masks
        assert truth is not None  # Federation.check_task ran before training
        return seg.SegScores(
            sites=(site.name,) * len(site.val),
            case_ids=_case_ids(site, site.val),
            counts=confusion_counts(pred, truth.cpu(), num_classes=num_classes).numpy(),
            hd95=np.asarray(hd95_of(pred > 0, truth.cpu() > 0), dtype=np.float64) if hd95 else None,
        )

    parts = [scores(s, trained.for_site(s.name)) for s in fed.sites if len(s.val)]
    out = {
        Split.INTERNAL: seg.SegScores(
            sites=tuple(x for p in parts for x in p.sites),
            case_ids=tuple(x for p in parts for x in p.case_ids),
            counts=np.concatenate([p.counts for p in parts]),
            hd95=np.concatenate([p.hd95 for p in parts if p.hd95 is not None]) if hd95 else None,
        )
    }
    if fed.external is not None and len(fed.external.val):
        out[Split.EXTERNAL] = scores(fed.external, trained.global_params)
    return out


def _masks(
    model: nn.Module, data: ArrayDataset, config: RunConfig, device: torch.device
) -> torch.Tensor:
    return predict_masks(
        model,
        data,
        device=device,
        batch_size=config.train.eval_batch_size,
        normalize=config.train.normalize,
    )


def _overlays(
    out_dir: Path,
    network: NetworkSpec,
    models: dict[str, _Trained],
    model: nn.Module,
    fed: Federation,
    config: RunConfig,
    device: torch.device,
    *,
    per_site: int,
) -> str | None:
    """The overlay figure of ``network``: federated and centralized predictions side by side
    (whichever of them the study trained); ``None`` if neither."""
    pairs = (("federated", Paradigm.FEDERATED), ("centralized", Paradigm.CENTRALIZED))
    keys = {title: str(p) for title, p in pairs if str(p) in models}
    if not keys:
        return None
    examples = []
    for site in (*fed.sites, *([fed.external] if fed.external is not None else [])):
        assert site.val.masks is not None
        idx = pick_examples(site.val.masks.cpu(), per_site=per_site)
        if not idx:
            continue
        chosen = site.val.subset(idx)
        assert chosen.masks is not None  # Federation.check_task ran before training
        predicted = {}
        for title, key in keys.items():
            trained = models[key]
            internal = site.name in fed.names
            load_params(model, trained.for_site(site.name) if internal else trained.global_params,
                        device)  # fmt: skip
            predicted[title] = _masks(model, chosen, config, device).numpy()
        ids = _case_ids(site, site.val)
        for j, i in enumerate(idx):
            image, truth = chosen.images[j].cpu().numpy(), chosen.masks[j].cpu().numpy()
            preds = {t: m[j] for t, m in predicted.items()}
            case = ids[i]
            if truth.ndim == 3:  # a volume: show the slice with the most ground truth
                k = int(truth.reshape(truth.shape[0], -1).sum(axis=1).argmax())
                image, truth = image[:, k], truth[k]
                preds = {t: m[k] for t, m in preds.items()}
                case = f"{case} z={k}"
            examples.append(
                Example(site=site.name, case_id=case, image=image, truth=truth, predicted=preds)
            )
    rel = f"overlays/{network.slug}.png"
    write_overlays(out_dir / rel, examples, title=f"{network.label}: validation examples")
    return rel


def _score(
    model: nn.Module, trained: _Trained, fed: Federation, config: RunConfig, device: torch.device
) -> dict[Split, SplitScores]:
    def predict(params: Params, data: ArrayDataset) -> np.ndarray:
        load_params(model, params, device)
        proba = predict_proba(
            model,
            data,
            device=device,
            batch_size=config.train.eval_batch_size,
            normalize=config.train.normalize,
        )
        return proba[:, 1]

    sites: list[str] = []
    cases: list[str] = []
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for site in fed.sites:
        if len(site.val) == 0:
            continue
        sites += [site.name] * len(site.val)
        cases += _case_ids(site, site.val)
        labels.append(site.val.labels.numpy())
        scores.append(predict(trained.for_site(site.name), site.val))
    out = {
        Split.INTERNAL: SplitScores(
            sites=tuple(sites),
            case_ids=tuple(cases),
            labels=np.concatenate(labels),
            scores=np.concatenate(scores),
        )
    }
    ext = fed.external
    if ext is not None and len(ext.val):
        out[Split.EXTERNAL] = SplitScores(
            sites=(ext.name,) * len(ext.val),
            case_ids=_case_ids(ext, ext.val),
            labels=ext.val.labels.numpy(),
            scores=predict(trained.global_params, ext.val),
        )
    return out


def run_study(
    config: StudyConfig,
    *,
    out_dir: str | Path,
    federation: Federation | None = None,
    progress: bool = True,
    report: bool = True,
) -> StudyResult:
    """Train, score, compare and report; see README "medfed study" for the files written."""
    out_dir = Path(out_dir)
    _claim_dir(out_dir, config)
    console = Console(stderr=True, soft_wrap=True, quiet=not progress)
    data_report = None
    if federation is None:
        console.print("[bold]Preparing the federation[/]")
        federation, data_report = load_federation(config.data)
        if data_report is not None:
            (out_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
    fed = federation
    segmenting = config.task is Task.SEGMENTATION
    if segmenting:
        try:
            fed.check_task(config.task)
        except ValueError as err:
            raise StudyError(str(err)) from None
    elif fed.num_classes > 2:
        raise StudyError(
            f"a study compares binary classifiers (ROC, sensitivity, ...); the federation has "
            f"{fed.num_classes} classes"
        )
    init = warm_start(config, out_dir, federation, console=console, progress=progress)
    device = resolve_device(config.device)
    site_names = fed.names
    predictions: dict[ModelKey, dict[Split, Any]] = {}
    overlays: dict[str, str] = {}

    def score(model: nn.Module, trained: _Trained, run_cfg: RunConfig) -> dict[Split, Any]:
        if segmenting:
            return _score_segmentation(model, trained, fed, run_cfg, device, hd95=config.stats.hd95)
        return _score(model, trained, fed, run_cfg, device)

    timing: dict[str, dict[str, dict[str, float]]] = {}
    communication: dict[str, dict[str, float]] = {}
    peer: dict[str, dict[str, Any]] = {}
    one_shot: dict[str, Any] = {}
    histories: dict[str, dict[str, str]] = {}
    total = len(config.networks) * len(config.paradigms)
    step = 0
    t0 = time.perf_counter()
    for net in config.networks:
        model: nn.Module | None = None
        models: dict[str, _Trained] = {}
        timing[net.label], histories[net.label] = {}, {}
        for paradigm in config.paradigms:
            step += 1
            run_cfg = config.run_config(net, paradigm, init=init.get(net.model.name))
            run_dir = _run_dir(out_dir, net, paradigm)
            console.print(
                f"[bold cyan][{step}/{total}][/] {net.label} ({net.model.name}) · {paradigm} · "
                f"{run_cfg.federation.rounds} rounds × {run_cfg.train.epochs:g} local epochs"
            )
            runs.train_or_reuse(run_cfg, run_dir, fed, progress=progress, tag=f"{net.label} ")
            if model is None:
                model = build_model(run_cfg, fed).to(device)
            if paradigm is Paradigm.LOCAL:
                for site in site_names:
                    site_dir = run_dir / "local" / site
                    key = local_key(site)
                    trained = _trained(run_cfg, site_dir, model, (site,))
                    predictions[(net.label, key)] = score(model, trained, run_cfg)
                    timing[net.label][key] = runs.timing(site_dir)
                    histories[net.label][key] = str(
                        (site_dir / "history.jsonl").relative_to(out_dir)
                    )
                continue
            train_sites = tuple(site_names) if paradigm is Paradigm.FEDERATED else ("pooled",)
            trained = _trained(run_cfg, run_dir, model, train_sites)
            key = str(paradigm)
            models[key] = trained
            predictions[(net.label, key)] = score(model, trained, run_cfg)
            timing[net.label][key] = runs.timing(run_dir)
            histories[net.label][key] = str((run_dir / "history.jsonl").relative_to(out_dir))
            if paradigm is Paradigm.FEDERATED:
                communication[net.label] = runs.communication(run_dir)
            if paradigm in decentral.PEER_PARADIGMS:  # each site's own model, beside the consensus
                own = _run_file(runs.peer_site_models, run_dir)
                by_site = {s: score(model, _fixed(own[s]), run_cfg) for s in site_names}
                peer.setdefault(net.label, {})[key] = decentral.peer_entry(
                    predictions[(net.label, key)], by_site, runs.summary(run_dir)
                )
        if Paradigm.ONE_SHOT in config.paradigms:
            ran = {p: _run_dir(out_dir, net, p) for p in config.paradigms}
            one_shot[net.label] = decentral.one_shot_entry(
                out_dir=out_dir,
                one_shot_dir=ran[Paradigm.ONE_SHOT],
                federated_dir=ran.get(Paradigm.FEDERATED),
                centralized_dir=ran.get(Paradigm.CENTRALIZED),
            )
        if segmenting and model is not None:
            rel = _overlays(
                out_dir,
                net,
                models,
                model,
                fed,
                config.run_config(net, Paradigm.FEDERATED, init=init.get(net.model.name)),
                device,
                per_site=config.stats.overlays_per_site,
            )
            if rel is not None:
                overlays[net.label] = rel
    labels = [n.label for n in config.networks]
    stats_args: dict[str, Any] = dict(
        networks=labels,
        site_names=site_names,
        resamples=config.stats.bootstrap_resamples,
        level=config.stats.level,
        seed=config.stats.seed,
    )
    if segmenting:
        console.print("[bold]Statistics[/]: bootstrap CIs over images, Wilcoxon signed-rank tests")
        results, comps = study_results(
            predictions, score=seg.model_results, compare=seg.comparisons, **stats_args
        )
    else:
        console.print("[bold]Statistics[/]: DeLong AUC CIs and tests, stratified bootstrap CIs")
        results, comps = study_results(predictions, **stats_args)
        comps += decentral.versus_centralized(predictions, networks=labels)
    paradigm_keys = [
        k
        for p in config.paradigms
        for k in ([local_key(s) for s in site_names] if p is Paradigm.LOCAL else [str(p)])
    ]
    doc: dict[str, Any] = {
        "config_hash": config_hash(config),
        "comparisons": comps,
        "timing": timing,
        "meta": {
            "name": config.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "medfed_version": _medfed_version(),
            "device": _device_name(device),
            "strategy": config.federation.strategy.name,
            "networks": labels,
            "models": {n.label: n.model.name for n in config.networks},
            "paradigms": paradigm_keys,
            "sites": list(site_names),
            "external_site": fed.external.name if fed.external is not None else None,
            "budget": {
                "pooled_epochs": config.budget.pooled_epochs,
                "rounds": config.federation.rounds,
                "train_images": sum(len(s.train) for s in fed.sites),
                "pretrain": pretrain_meta(config, out_dir),
            },
            "task": str(config.task),
            "bootstrap": {
                "n_resamples": config.stats.bootstrap_resamples,
                "level": config.stats.level,
                "seed": config.stats.seed,
            },
            "communication": communication,
            "histories": histories,
            "wall_seconds": time.perf_counter() - t0,
        },
        **results,
    }
    if segmenting:
        doc["meta"] |= {"metrics": list(seg.METRICS), "overlays": overlays}
        seg.write_counts(out_dir / "segmentation.csv", predictions)
    else:
        doc["meta"]["threshold_rule"] = THRESHOLD_RULE
        write_predictions(out_dir / "predictions.csv", predictions)
    # Every run's summary.json sits beside its history.jsonl (local-only: one per site).
    run_dirs = {
        n: {k: (out_dir / rel).parent for k, rel in h.items()} for n, h in histories.items()
    }
    doc |= {
        str(k): v
        for k, v in ((decentral.Block.PEER, peer), (decentral.Block.ONE_SHOT, one_shot))
        if v
    }
    doc["meta"]["privacy"] = privacy_meta(config, run_dirs)
    doc["privacy"] = privacy_cost(doc)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2, allow_nan=False))
    html = md = None
    if report:
        from medfed.report import write_report

        html, md = write_report(out_dir)
        console.print(f"[bold green]Report[/]: {html}")
    return StudyResult(out_dir=out_dir, results=doc, report_html=html, report_md=md)
