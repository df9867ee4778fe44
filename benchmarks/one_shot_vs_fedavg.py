"""One-shot FedISCA vs FedAvg with 1 and R rounds vs centralized, on one federation (issue #7).

Prints accuracy and AUC on pooled internal validation and the external site, the transfers per
site, and the two ratios the issue targets: one-shot / 1-round FedAvg (must clearly exceed 1) and
one-shot / R-round FedAvg accuracy (target >= 0.90). All runs share data, seed and model.

Accuracy is given twice: at the fixed 0.5 cut, and at each model's own operating point - the
Youden threshold chosen on pooled internal validation and then applied unchanged to the external
site, as ``medfed study`` does. A distilled student's probabilities are softened by the
temperature, so 0.5 can sit far from its best cut; the external figure at the internal threshold
is the fair one (nothing about the external site is tuned).

Two extra rows score what the uploaded teachers give without distillation: their ensemble (the
mean of their probabilities: the most the student could copy, so it separates a distillation
shortfall from teachers that are weak to begin with) and their example-weighted average, which is
1-round FedAvg with the teachers' whole local training in its one round (the "1 round" row runs
the preset's per-round local epochs instead). Paired tests on the same images say whether a gap is
more than chance: DeLong for AUC, exact McNemar for accuracy at each model's cut.

``--reuse`` rescores the runs already in ``--out`` (same config hash) instead of training again.

    python benchmarks/one_shot_vs_fedavg.py                                # configs/one-shot-thyroid.yaml
    python benchmarks/one_shot_vs_fedavg.py --set data.ultrasound.scale=0.05 \\
        --set one_shot.fedisca.synthesis_iterations=4 ...                  # smoke run
    python benchmarks/one_shot_vs_fedavg.py --config configs/one-shot-medmnist.yaml --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import binomtest  # noqa: E402

from medfed.algorithms.base import load_params  # noqa: E402
from medfed.build import build_model  # noqa: E402
from medfed.checkpoint import load_params as load_checkpoint_params  # noqa: E402
from medfed.client.train import predict_proba  # noqa: E402
from medfed.config import RunConfig, config_hash, load_config  # noqa: E402
from medfed.data.site import ArrayDataset, Federation  # noqa: E402
from medfed.engine import load_federation, run  # noqa: E402
from medfed.metrics.binary import Metric, threshold_metrics, youden_threshold  # noqa: E402
from medfed.metrics.classification import roc_auc  # noqa: E402
from medfed.metrics.delong import delong_test  # noqa: E402
from medfed.one_shot import averaged_teachers, teacher_config  # noqa: E402
from medfed.types import Paradigm, Params  # noqa: E402


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    cut: float
    val_acc: float
    val_auc: float
    val_acc_cut: float
    ext_acc: float | None = None
    ext_auc: float | None = None
    ext_acc_cut: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One run as its own ``summary.json`` scores it (threshold 0.5), plus its operating point."""

    val_acc: float
    val_auc: float
    ext_acc: float
    ext_auc: float
    point: OperatingPoint


Scorer = Callable[[ArrayDataset], np.ndarray]


def module_scorer(cfg: RunConfig, model: torch.nn.Module) -> Scorer:
    """P(positive) of ``model``, on the CPU, with the run's normalisation."""
    device = torch.device("cpu")

    def scores(data: ArrayDataset) -> np.ndarray:
        proba = predict_proba(
            model, data, device=device, batch_size=cfg.train.eval_batch_size,
            normalize=cfg.train.normalize,
        )  # fmt: skip
        return proba[:, 1]

    return scores


def model_scorer(cfg: RunConfig, fed: Federation, params: Params) -> Scorer:
    model = build_model(cfg, fed)
    load_params(model, params, torch.device("cpu"))
    return module_scorer(cfg, model)


def load_teachers(cfg: RunConfig, fed: Federation, run_dir: Path) -> list[torch.nn.Module]:
    """A one-shot run's uploaded site models, each in its own network, as its server loads them."""
    models = []
    for site in fed.sites:
        path = run_dir / "sites" / site.name / "final.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path}: no teacher for site {site.name!r} (is {run_dir} one-shot?)")
        model = build_model(teacher_config(cfg, site.name), fed)
        load_params(model, load_checkpoint_params(path), torch.device("cpu"))
        models.append(model.eval())
    return models


def ensemble_scorer(cfg: RunConfig, teachers: list[torch.nn.Module]) -> Scorer:
    """The uploaded teachers' averaged probability: what distillation can at best copy.

    Serving this ensemble is itself a one-shot method (one upload per site, every site's model
    kept at the server), so its row is both the ceiling of the student and a baseline for it.
    """
    members = [module_scorer(cfg, t) for t in teachers]

    def scores(data: ArrayDataset) -> np.ndarray:
        return np.mean([m(data) for m in members], axis=0)

    return scores


def paired_tests(fed: Federation, a: Scorer, b: Scorer, cut_a: float, cut_b: float) -> str:
    """DeLong on AUC (internal, external) and exact McNemar on internal accuracy at the cuts."""
    y, pa = pooled_val(fed, a)
    _, pb = pooled_val(fed, b)
    val = delong_test(y, pa, pb)
    right_a, right_b = (pa >= cut_a) == y.astype(bool), (pb >= cut_b) == y.astype(bool)
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    mcnemar = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    text = (
        f"val AUC {val.difference:+.3f} (DeLong p {val.p_value:.2g}); val acc at the cuts "
        f"{(right_a.mean() - right_b.mean()):+.3f} (McNemar p {mcnemar:.2g}, {only_a} vs {only_b} "
        "images right for one model only)"
    )
    if fed.external is not None and len(fed.external.val):
        ext = fed.external.val
        e = delong_test(ext.labels.numpy(), a(ext), b(ext))
        text += f"; external AUC {e.difference:+.3f} (DeLong p {e.p_value:.2g})"
    return text


def pooled_val(fed: Federation, scores: Scorer) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of every site's internal validation split, pooled."""
    vals = [s.val for s in fed.sites if len(s.val)]
    y = np.concatenate([d.labels.numpy() for d in vals])
    return y, np.concatenate([scores(d) for d in vals])


def operating_point(fed: Federation, scores: Scorer) -> OperatingPoint:
    """Accuracy at 0.5 and AUC, and the accuracies at the Youden cut of pooled internal
    validation (the cut then applied unchanged to the external site)."""
    y, p = pooled_val(fed, scores)
    cut = youden_threshold(y, p)
    point = OperatingPoint(
        cut=cut,
        val_acc=threshold_metrics(y, p, 0.5)[Metric.ACCURACY],
        val_auc=roc_auc(y, p),
        val_acc_cut=threshold_metrics(y, p, cut)[Metric.ACCURACY],
    )
    if fed.external is not None and len(fed.external.val):
        ext = fed.external.val
        y_ext, p_ext = ext.labels.numpy(), scores(ext)
        point = dataclasses.replace(
            point,
            ext_acc=threshold_metrics(y_ext, p_ext, 0.5)[Metric.ACCURACY],
            ext_auc=roc_auc(y_ext, p_ext),
            ext_acc_cut=threshold_metrics(y_ext, p_ext, cut)[Metric.ACCURACY],
        )
    return point


def print_cut(op: OperatingPoint) -> None:
    ext = "n/a" if op.ext_acc_cut is None else f"{op.ext_acc_cut:.3f}"
    print(
        f"{'':>12}  at the internal Youden cut {op.cut:.3f}: val acc {op.val_acc_cut:.3f}  external acc {ext}",
        flush=True,
    )


def finished(run_dir: Path, cfg: RunConfig) -> tuple[dict | None, Params | None]:
    """A finished run's summary and final weights, if ``run_dir`` holds one of ``cfg``."""
    summary, weights = run_dir / "summary.json", run_dir / "final.safetensors"
    if not (summary.is_file() and weights.is_file()):
        return None, None
    s = json.loads(summary.read_text())
    if s.get("config_hash") != config_hash(cfg):
        raise SystemExit(f"{summary}: a run of another config; rerun without --reuse")
    return s, load_checkpoint_params(weights)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/one-shot-thyroid.yaml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    ap.add_argument(
        "--reuse", action="store_true", help="rescore finished runs in --out with the same config"
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = load_config(args.config, args.overrides)
    rounds = base.federation.rounds
    fed, _ = load_federation(base.data)
    for site in fed.sites:  # the heterogeneity the runs face (label skew for partitioned data)
        print(f"{site.name:>12}: train {site.train.class_counts()}  val {site.val.class_counts()}")
    out = Path(args.out or tempfile.mkdtemp(prefix="oneshot-"))
    variants = {
        "one_shot": base,
        "fedavg_1": base.model_copy(
            update={
                "paradigm": Paradigm.FEDERATED,
                "federation": base.federation.model_copy(update={"rounds": 1, "min_clients": 2}),
            }
        ),
        f"fedavg_{rounds}": base.model_copy(
            update={
                "paradigm": Paradigm.FEDERATED,
                "federation": base.federation.model_copy(update={"min_clients": 2}),
            }
        ),
        "centralized": base.model_copy(update={"paradigm": Paradigm.CENTRALIZED}),
    }
    rows: dict[str, Row] = {}
    scorers: dict[str, Scorer] = {}
    points: dict[str, OperatingPoint] = {}  # every scored model, the teachers' rows included
    for name, cfg in variants.items():
        cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the edited copy
        t0 = time.perf_counter()
        s, final = finished(out / name, cfg) if args.reuse else (None, None)
        if s is None or final is None:
            res = run(cfg, out_dir=out / name, federation=fed, progress=False)
            s, final = res.summary, res.final_params
        ext = s.get("external") or {}
        transfers = (
            1 if name == "one_shot" else (2 * cfg.federation.rounds if name != "centralized" else 0)
        )
        wall = time.perf_counter() - t0
        scorers[name] = model_scorer(cfg, fed, final)
        points[name] = op = operating_point(fed, scorers[name])
        rows[name] = row = Row(
            val_acc=s["val"].get("acc"),
            val_auc=s["val"].get("auc"),
            ext_acc=ext.get("acc"),
            ext_auc=ext.get("auc"),
            point=op,
        )
        print(
            f"{name:>12}: val acc {row.val_acc:.3f} auc {row.val_auc:.3f}  external acc {row.ext_acc:.3f} auc {row.ext_auc:.3f}  transfers/site {transfers}  {wall:.0f}s",
            flush=True,
        )
        print_cut(op)
        if name == "one_shot":
            teachers = load_teachers(cfg, fed, out / name)
            scorers["ensemble"] = ensemble_scorer(cfg, teachers)
            points["ensemble"] = ens = operating_point(fed, scorers["ensemble"])
            ext_acc = "n/a" if ens.ext_acc is None else f"{ens.ext_acc:.3f}"
            ext_auc = "n/a" if ens.ext_auc is None else f"{ens.ext_auc:.3f}"
            print(
                f"{'ensemble':>12}: val acc {ens.val_acc:.3f} auc {ens.val_auc:.3f}  external acc {ext_acc} auc {ext_auc}  (the {len(fed.sites)} teachers' mean probability: the student's ceiling)",
                flush=True,
            )
            print_cut(ens)
            scorers["average"] = module_scorer(cfg, averaged_teachers(cfg, fed, teachers).eval())
            points["average"] = avg = operating_point(fed, scorers["average"])
            ext_auc = "n/a" if avg.ext_auc is None else f"{avg.ext_auc:.3f}"
            print(
                f"{'average':>12}: val acc {avg.val_acc:.3f} auc {avg.val_auc:.3f}  external auc {ext_auc}  (the teachers' weighted mean: FedAvg, 1 round of their {rounds} local epochs)",
                flush=True,
            )
            print_cut(avg)
    one, f1, fr = rows["one_shot"], rows["fedavg_1"], rows[f"fedavg_{rounds}"]
    print(
        f"one-shot / FedAvg(1 round):  acc {one.val_acc / f1.val_acc:.3f}  auc {one.val_auc / f1.val_auc:.3f}"
    )
    print(
        f"one-shot / FedAvg({rounds} rounds): acc {one.val_acc / fr.val_acc:.3f}  auc {one.val_auc / fr.val_auc:.3f}  (target acc >= 0.90)"
    )
    print("at each model's internal Youden cut:")
    for label, ref in (("1 round", f1.point), (f"{rounds} rounds", fr.point)):
        a, b = one.point.ext_acc_cut, ref.ext_acc_cut
        ratio_ext = "n/a" if a is None or not b else f"{a / b:.3f}"
        print(
            f"  one-shot / FedAvg({label}): val acc {one.point.val_acc_cut / ref.val_acc_cut:.3f}  external acc {ratio_ext}"
        )
    ensemble = points.get("ensemble")
    if ensemble is not None:
        print(
            f"one-shot / teacher ensemble: val acc at the cut {one.point.val_acc_cut / ensemble.val_acc_cut:.3f}  "
            f"ensemble / FedAvg({rounds} rounds): val acc at the cut {ensemble.val_acc_cut / fr.point.val_acc_cut:.3f}"
        )
    print("paired tests, one-shot minus:")
    for other in ("fedavg_1", "average", f"fedavg_{rounds}"):
        if other in scorers:
            cuts = points["one_shot"].cut, points[other].cut
            tests = paired_tests(fed, scorers["one_shot"], scorers[other], *cuts)
            print(f"  {other:>10}: {tests}", flush=True)
    print(f"runs kept in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
