"""One-shot FedISCA vs FedAvg with 1 and R rounds vs centralized, on one federation (issue #7).

Prints accuracy and AUC on pooled internal validation and the external site, the transfers per
site, and the two ratios the issue targets: one-shot / 1-round FedAvg (must clearly exceed 1) and
one-shot / R-round FedAvg accuracy (target >= 0.90). All runs share data, seed and model.

Accuracy is given twice: at the fixed 0.5 cut, and at each model's own operating point - the
Youden threshold chosen on pooled internal validation and then applied unchanged to the external
site, as ``medfed study`` does. A distilled student's probabilities are softened by the
temperature, so 0.5 can sit far from its best cut; the external figure at the internal threshold
is the fair one (nothing about the external site is tuned).

An extra row scores the teacher ensemble (the mean of the uploaded site models' probabilities):
the most the student could copy from them, so it separates a distillation shortfall from teachers
that are weak to begin with.

    python benchmarks/one_shot_vs_fedavg.py                                # configs/one-shot-thyroid.yaml
    python benchmarks/one_shot_vs_fedavg.py --set data.ultrasound.scale=0.05 \\
        --set one_shot.fedisca.synthesis_iterations=4 ...                  # smoke run
    python benchmarks/one_shot_vs_fedavg.py --config configs/one-shot-medmnist.yaml --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfed.algorithms.base import load_params  # noqa: E402
from medfed.build import build_model  # noqa: E402
from medfed.checkpoint import load_params as load_checkpoint_params  # noqa: E402
from medfed.client.train import predict_proba  # noqa: E402
from medfed.config import RunConfig, load_config  # noqa: E402
from medfed.data.site import ArrayDataset, Federation  # noqa: E402
from medfed.engine import load_federation, run  # noqa: E402
from medfed.metrics.binary import Metric, threshold_metrics, youden_threshold  # noqa: E402
from medfed.metrics.classification import roc_auc  # noqa: E402
from medfed.one_shot import teacher_config  # noqa: E402
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


def ensemble_scorer(cfg: RunConfig, fed: Federation, run_dir: Path) -> Scorer:
    """The uploaded teachers' averaged probability: what distillation can at best copy.

    Serving this ensemble is itself a one-shot method (one upload per site, every site's model
    kept at the server), so its row is both the ceiling of the student and a baseline for it.
    """
    members = [module_scorer(cfg, t) for t in load_teachers(cfg, fed, run_dir)]

    def scores(data: ArrayDataset) -> np.ndarray:
        return np.mean([m(data) for m in members], axis=0)

    return scores


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/one-shot-thyroid.yaml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
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
    ensemble: OperatingPoint | None = None
    for name, cfg in variants.items():
        cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the edited copy
        t0 = time.perf_counter()
        res = run(cfg, out_dir=out / name, federation=fed, progress=False)
        s = res.summary
        ext = s.get("external") or {}
        transfers = (
            1 if name == "one_shot" else (2 * cfg.federation.rounds if name != "centralized" else 0)
        )
        wall = time.perf_counter() - t0
        op = operating_point(fed, model_scorer(cfg, fed, res.final_params))
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
            ens = operating_point(fed, ensemble_scorer(cfg, fed, out / name))
            ext_acc = "n/a" if ens.ext_acc is None else f"{ens.ext_acc:.3f}"
            ext_auc = "n/a" if ens.ext_auc is None else f"{ens.ext_auc:.3f}"
            print(
                f"{'ensemble':>12}: val acc {ens.val_acc:.3f} auc {ens.val_auc:.3f}  external acc {ext_acc} auc {ext_auc}  (the {len(fed.sites)} teachers' mean probability: the student's ceiling)",
                flush=True,
            )
            print_cut(ens)
            ensemble = ens
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
    if ensemble is not None:
        print(
            f"one-shot / teacher ensemble: val acc at the cut {one.point.val_acc_cut / ensemble.val_acc_cut:.3f}  "
            f"ensemble / FedAvg({rounds} rounds): val acc at the cut {ensemble.val_acc_cut / fr.point.val_acc_cut:.3f}"
        )
    print(f"runs kept in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
