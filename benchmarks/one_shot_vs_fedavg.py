"""One-shot FedISCA vs FedAvg with 1 and R rounds vs centralized, on one federation (issue #7).

Prints accuracy and AUC on pooled internal validation and the external site, the transfers per
site, and the two ratios the issue targets: one-shot / 1-round FedAvg (must clearly exceed 1) and
one-shot / R-round FedAvg accuracy (target >= 0.90). All runs share data, seed and model.

    python benchmarks/one_shot_vs_fedavg.py                                # configs/one-shot-thyroid.yaml
    python benchmarks/one_shot_vs_fedavg.py --set data.ultrasound.scale=0.05 \\
        --set one_shot.fedisca.synthesis_iterations=4 ...                  # smoke run
    python benchmarks/one_shot_vs_fedavg.py --config configs/one-shot-medmnist.yaml --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfed.config import load_config  # noqa: E402
from medfed.engine import load_federation, run  # noqa: E402
from medfed.types import Paradigm  # noqa: E402


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
    rows = {}
    for name, cfg in variants.items():
        cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the edited copy
        t0 = time.perf_counter()
        res = run(cfg, out_dir=out / name, federation=fed, progress=False)
        s = res.summary
        ext = s.get("external") or {}
        transfers = (
            1 if name == "one_shot" else (2 * cfg.federation.rounds if name != "centralized" else 0)
        )
        rows[name] = (
            s["val"].get("acc"),
            s["val"].get("auc"),
            ext.get("acc"),
            ext.get("auc"),
            transfers,
            time.perf_counter() - t0,
        )
        print(
            f"{name:>12}: val acc {rows[name][0]:.3f} auc {rows[name][1]:.3f}  external acc {rows[name][2]:.3f} auc {rows[name][3]:.3f}  transfers/site {transfers}  {rows[name][5]:.0f}s",
            flush=True,
        )
    one, f1, fr = rows["one_shot"], rows["fedavg_1"], rows[f"fedavg_{rounds}"]
    print(f"one-shot / FedAvg(1 round):  acc {one[0] / f1[0]:.3f}  auc {one[1] / f1[1]:.3f}")
    print(
        f"one-shot / FedAvg({rounds} rounds): acc {one[0] / fr[0]:.3f}  auc {one[1] / fr[1]:.3f}  (target acc >= 0.90)"
    )
    print(f"runs kept in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
