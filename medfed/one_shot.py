"""One-shot FL (FedISCA): every site trains once and uploads once; the server distills.

The paradigm ``one_shot`` runs in two stages:

1. each site trains its own model on its own data (exactly a local-only run, checkpointed and
   resumable per site) and uploads the final weights once: one transfer per site, none back;
2. the server distills the teachers into one global model through images synthesized from the
   teachers themselves (:mod:`medfed.algorithms.fedisca`), choosing the distillation epoch on
   pooled internal *validation* data only.

Teachers may differ in architecture (``one_shot.teacher_models``). The synthesized images never
existed at any site; the snapshots (noise to realistic) are saved as a picture for the report.

With ``ledger.enabled`` each teacher keeps its own local-training ledger (``sites/<site>/ledger``)
and the run's ledger records each site's signed upload and the distillation
(:mod:`medfed.audit.p2p`); ``medfed ledger verify RUN_DIR`` checks both the chain and the
teachers' files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from medfed.algorithms.base import load_params
from medfed.algorithms.fedisca import one_shot, teacher_average, to_display
from medfed.algorithms.fedisca_synthesis import Synthesis
from medfed.audit.p2p import PeerLedger
from medfed.build import build_model
from medfed.checkpoint import save_params
from medfed.client.train import resolve_device
from medfed.config import ModelConfig, RunConfig, config_hash
from medfed.data.site import Federation
from medfed.evaluation import PRIMARY_METRIC, Evaluator, evaluate_external
from medfed.history import History, RoundRecord, SiteRound
from medfed.privacy.run import create_algorithm
from medfed.progress import Reporter
from medfed.seeding import torch_generator
from medfed.types import Task, params_nbytes

if TYPE_CHECKING:
    from medfed.engine import RunResult

SNAPSHOT_FIGURE = "one_shot_synthesis.png"


def teacher_config(config: RunConfig, site: str) -> RunConfig:
    """The run's config with ``site``'s own network (``one_shot.teacher_models``), if any."""
    name = config.one_shot.teacher_models.get(site)
    if name is None:
        return config
    return config.model_copy(update={"model": ModelConfig(name=name)})


def averaged_teachers(
    config: RunConfig, fed: Federation, teachers: Sequence[nn.Module]
) -> nn.Module:
    """The teachers' mean weighted by each site's training examples: 1-round FedAvg whose one
    round is the teachers' whole local training (they start from the same seeded weights)."""
    model = build_model(config, fed)
    model.load_state_dict(teacher_average(teachers, [float(len(site.train)) for site in fed.sites]))
    return model


def initial_student(config: RunConfig, fed: Federation, teachers: Sequence[nn.Module]) -> nn.Module:
    """The global model before distillation: the run's seeded initial weights, or with
    ``student_init: average`` the teachers' average (:func:`averaged_teachers`)."""
    if config.one_shot.fedisca.student_init == "average":
        return averaged_teachers(config, fed, teachers)
    return build_model(config, fed)


def _grid(synthesis: Synthesis, *, rows: int = 6, per_class: int = 4) -> np.ndarray:
    """Snapshots from noise (top) to final (bottom), ``per_class`` images of each class."""
    snaps = synthesis.snapshots
    pick = sorted({round(i * (len(snaps) - 1) / max(rows - 1, 1)) for i in range(rows)})
    labels = snaps[0].labels
    cols = [
        int(i)
        for c in sorted(set(labels.tolist()))
        for i in (labels == c).nonzero().flatten()[:per_class]
    ]
    tiles = [to_display(snaps[k].images[cols]) for k in pick]  # (cols, C, H, W) uint8 each
    rows_img = [np.concatenate([t[j, 0].numpy() for j in range(len(cols))], axis=1) for t in tiles]
    return np.concatenate(rows_img, axis=0)


def run_one_shot(
    config: RunConfig,
    fed: Federation,
    *,
    out_dir: Path,
    resume: bool,
    reporter: Reporter,
    label: str,
) -> RunResult:
    """Train every site once, distill on the server."""
    from medfed.engine import (
        FederationError,
        _prepare_dir,
        _train_rounds,
        run_scorer,
    )
    from medfed.engine import RunResult as Result

    if config.task is not Task.CLASSIFICATION:
        raise FederationError("one-shot FedISCA distils classifiers; the task is segmentation")
    if config.privacy.dp is not None or config.privacy.he is not None:
        raise FederationError(
            "one_shot uploads each site's model once, unprotected; privacy.dp/he are not "
            "supported with it"
        )
    unknown = sorted(set(config.one_shot.teacher_models) - set(fed.names))
    if unknown:
        raise FederationError(f"one_shot.teacher_models names unknown site(s) {unknown}")
    other = {s: m for s, m in config.one_shot.teacher_models.items() if m != config.model.name}
    if config.one_shot.fedisca.student_init == "average" and other:
        raise FederationError(
            "one_shot.fedisca.student_init 'average' needs every teacher in the run's network "
            f"{config.model.name!r}; one_shot.teacher_models gives {other}"
        )
    _prepare_dir(out_dir, config, resume=resume)
    t_start = time.perf_counter()
    ledger = PeerLedger.for_run(config, out_dir, sites=fed.names, config_hash=config_hash(config))
    if ledger is not None:  # the teachers are redone or resumed, the distillation redone whole
        ledger.begin(
            last_round=-1,
            sites=fed.names,
            initial=None,  # every teacher is recorded in its own ledger from its own start
            strategy="fedisca",
            topology={"name": str(config.paradigm)},
        )
        ledger.deliver()
    device = resolve_device(config.device)
    teachers: list[nn.Module] = []
    site_rows: dict[str, SiteRound] = {}
    upload = 0
    for site in fed.sites:
        site_cfg = teacher_config(config, site.name)
        site_dir = out_dir / "sites" / site.name
        res = _train_rounds(
            site_cfg,
            train_sites=[site],
            eval_sites=fed.sites,
            external=fed.external,
            strategy_name="fedavg",
            strategy_options={},
            min_clients=1,
            fraction=1.0,
            out_dir=site_dir,
            resume=resume and site_dir.exists(),
            reporter=reporter,
            label=f"{label} teacher {site.name}",
        )
        teacher = build_model(site_cfg, fed).to(device)
        load_params(teacher, res.final_params, device)
        teachers.append(teacher.eval())
        upload += params_nbytes(res.final_params)
        last = res.history.last or {}
        site_rows[site.name] = SiteRound(
            train_loss=float(last.get("sites", {}).get(site.name, {}).get("train_loss", np.nan)),
            examples=sum(int(r["sites"][site.name]["examples"]) for r in res.history),
            steps=sum(int(r["sites"][site.name]["steps"]) for r in res.history),
        )
        if ledger is not None:
            ledger.upload(
                site=site.name,
                params=res.final_params,
                num_examples=len(site.train),
                metrics={"train_loss": site_rows[site.name].train_loss},
                teacher_dir=site_dir,
                teacher_model=site_cfg.model.name,
            )
    # --- the server: distill the teachers into one model ---
    t0 = time.perf_counter()
    reporter.start(f"{label} distillation", total=1)
    student = initial_student(config, fed, teachers).to(device)
    scorer = run_scorer(config, fed, device)
    evaluator = Evaluator(fed.sites, scorer=scorer)
    plain = create_algorithm(config, num_sites=len(fed.sites), name="fedavg", options={})
    primary = PRIMARY_METRIC[config.task]

    def validate(model: nn.Module) -> float:
        """Pooled internal validation only: the test split and the external site are never used."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        val, _ = evaluator(model, plain, state, {})
        model.train()
        return float(np.nan_to_num(val[primary], nan=-1.0))

    sample = fed.sites[0].train.images
    last_synthesis: list[Synthesis] = []

    def keep_last(_: int, synthesis: Synthesis) -> None:
        last_synthesis[:] = [synthesis]  # the final round's snapshots make the report's grid

    result = one_shot(
        teachers,
        student,
        num_classes=max(2, fed.num_outputs(config.task)),
        image_shape=(int(sample.shape[1]), int(sample.shape[2]), int(sample.shape[3])),
        options=config.one_shot.fedisca,
        generator=torch_generator(config.seed, "fedisca"),
        device=device,
        validate=validate,
        on_round=keep_last,
    )
    final = {k: v.to(device) for k, v in result.state_dict.items()}
    val, site_val = evaluator(student, plain, final, {})
    ext = evaluate_external(student, final, fed.external, scorer=scorer)
    if last_synthesis:
        from PIL import Image

        Image.fromarray(_grid(last_synthesis[0])).save(out_dir / SNAPSHOT_FIGURE)
    record = RoundRecord(
        round=0,
        participants=list(fed.names),
        sites=site_rows,
        val=dict(val),
        site_val=site_val,
        rejected={},
        bytes_up=upload,
        bytes_down=0,  # every site derives its initial model from the seed: nothing is sent down
        seconds=time.perf_counter() - t0,
        external=None if ext is None else dict(ext),
        extra={
            "one_shot": {
                "transfers_per_site": 1,
                "teachers": {s.name: teacher_config(config, s.name).model.name for s in fed.sites},
                "best_epoch": result.best_epoch,
                "validation": list(result.validation),
                "distill_loss": list(result.losses),
                "synthesis_figure": SNAPSHOT_FIGURE if last_synthesis else None,
            }
        },
    )
    hist_path = out_dir / "history.jsonl"
    hist_path.unlink(missing_ok=True)  # the distillation is redone whole on resume
    history = History(hist_path)
    history.append(record)
    save_params(final, out_dir / "final.safetensors")
    if ledger is not None:
        ledger.round(
            0,
            consensus=final,
            included=list(fed.names),
            rejected={},
            strategy="fedisca",
            extra={
                "distill": {
                    "fedisca": config.one_shot.fedisca.model_dump(mode="json"),
                    "seed": config.seed,
                    "best_epoch": result.best_epoch,
                }
            },
        )
        ledger.end(
            rounds=1,
            final_params=final,
            final=out_dir / "final.safetensors",
            files=[out_dir / "sites" / s / "final.safetensors" for s in fed.names],
        )
    from medfed.history import run_summary

    summary = run_summary(history, config, config_hash(config), time.perf_counter() - t_start)
    summary["one_shot"] = record.extra["one_shot"] | {"bytes_per_site_up": upload // len(fed.sites)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    reporter.round_done(record)
    reporter.stop()
    return Result(history, summary, final)
