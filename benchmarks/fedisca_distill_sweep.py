"""Distillation settings of a finished one-shot FedISCA run, swept on the run's own syntheses.

FedISCA's synthesis depends on the teachers and the seed only, never on the student, so every
distillation setting (learning rate, passes per round, temperature, optimizer, adaptation) can be
tried on the *same* synthetic images: they are synthesized once (the costly part, identical to
the run's: same teachers, same seeded generator), then each variant distils a fresh student from
them. Each variant changes one setting from the run's; the run's own setting is the reference
row, and its score should reproduce the run's ``summary.json`` (printed side by side).

Model selection is the run's: the best distillation epoch by pooled internal validation AUC.
Every variant is then scored like ``one_shot_vs_fedavg.py`` scores models: accuracy at 0.5, AUC,
and accuracy at the Youden cut of internal validation, applied unchanged to the external site.
The variants are chosen on that same internal split, so a winner's internal figures are selected
ones; the external site's are not.

    python benchmarks/one_shot_vs_fedavg.py --out runs/oneshot      # makes runs/oneshot/one_shot
    python benchmarks/fedisca_distill_sweep.py --run runs/oneshot/one_shot \\
        --vary distill_lr=0.01,0.03 --vary distill_epochs=4 --vary temperature=4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from one_shot_vs_fedavg import (  # noqa: E402
    OperatingPoint,
    load_teachers,
    model_scorer,
    module_scorer,
    operating_point,
    pooled_val,
)

from medfed.algorithms.fedisca import Distiller, adapt_teachers  # noqa: E402
from medfed.algorithms.fedisca_synthesis import (  # noqa: E402
    FedISCAOptions,
    Snapshot,
    Synthesis,
    synthesize,
)
from medfed.config import RunConfig, load_config  # noqa: E402
from medfed.data.site import Federation  # noqa: E402
from medfed.engine import load_federation  # noqa: E402
from medfed.metrics.classification import roc_auc  # noqa: E402
from medfed.one_shot import initial_student  # noqa: E402
from medfed.seeding import torch_generator  # noqa: E402

# What a variant may change: everything after the synthesis. Synthesis settings would need new
# images, which is a new one-shot run, not a sweep over this one.
DISTILL_FIELDS = frozenset(
    {
        "distill_lr",
        "distill_epochs",
        "distill_optimizer",
        "distill_momentum",
        "distill_weight_decay",
        "temperature",
        "lr_gamma",
        "adapt_momentum",
        "adapted_bn",
        "student_init",
    }
)


def parse_variants(specs: list[str]) -> list[tuple[str, str]]:
    """``key=v1,v2`` -> [(key, v1), (key, v2)]: one setting changed per variant."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise SystemExit(f"--vary takes key=v1[,v2...], got {spec!r}")
        if key not in DISTILL_FIELDS:
            raise SystemExit(
                f"--vary {key!r}: only distillation settings can be swept on fixed syntheses "
                f"({', '.join(sorted(DISTILL_FIELDS))})"
            )
        out += [(key, v) for v in values.split(",")]
    return out


def _synthesis_path(cache: Path, round_idx: int) -> Path:
    return cache / f"synthesis-{round_idx:03d}.safetensors"


def synthesis_key(cfg: RunConfig, run_dir: Path, fed: Federation) -> str:
    """What the images depend on: the synthesis settings, the seed and the teachers' files. A
    cache made under another key belongs to another run and is refused, not silently reused."""
    opts = cfg.one_shot.fedisca.model_dump(mode="json", exclude=set(DISTILL_FIELDS))
    h = hashlib.sha256(json.dumps([opts, cfg.seed], sort_keys=True).encode())
    for site in fed.sites:
        h.update((run_dir / "sites" / site.name / "final.safetensors").read_bytes())
    return h.hexdigest()[:16]


def save_synthesis(
    synthesis: Synthesis, cache: Path, round_idx: int, generator: torch.Generator, *, key: str
) -> None:
    """One round's snapshots, and the generator's state after it (so a later round resumes the
    run's random stream exactly)."""
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {"generator": generator.get_state()}
    for k, snap in enumerate(synthesis.snapshots):
        tensors[f"{k:04d}.images"] = snap.images.contiguous()
        tensors[f"{k:04d}.labels"] = snap.labels.clone()  # snapshots share one label tensor
    meta = {
        "key": key,
        "iterations": json.dumps([snap.iteration for snap in synthesis.snapshots]),
        "losses": json.dumps(synthesis.losses),
        "teacher_accuracy": str(synthesis.teacher_accuracy),
    }
    save_file(tensors, _synthesis_path(cache, round_idx), metadata=meta)


def load_synthesis(
    cache: Path, round_idx: int, generator: torch.Generator, *, key: str
) -> Synthesis | None:
    path = _synthesis_path(cache, round_idx)
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        if meta.get("key") != key:
            raise SystemExit(
                f"{path}: synthesized for other teachers, seed or synthesis settings "
                f"(key {meta.get('key')}, this run {key}); use another --cache folder"
            )
        iterations = json.loads(meta["iterations"])
        snaps = tuple(
            Snapshot(it, f.get_tensor(f"{k:04d}.images"), f.get_tensor(f"{k:04d}.labels"))
            for k, it in enumerate(iterations)
        )
        generator.set_state(f.get_tensor("generator"))
    return Synthesis(snaps, json.loads(meta["losses"]), float(meta["teacher_accuracy"]))


def pooled_val_auc(cfg: RunConfig, fed: Federation, student: torch.nn.Module) -> float:
    return roc_auc(*pooled_val(fed, module_scorer(cfg, student)))


def distil(
    cfg: RunConfig,
    fed: Federation,
    options: FedISCAOptions,
    teachers: list[torch.nn.Module],
    syntheses: list[Synthesis],
) -> tuple[OperatingPoint, int]:
    """A fresh student (the run's seeded initial weights, or the teachers' mean with
    ``student_init: average``) through every round's synthesis."""
    device = torch.device("cpu")
    one_shot = cfg.one_shot.model_copy(update={"fedisca": options})
    student = initial_student(cfg.model_copy(update={"one_shot": one_shot}), fed, teachers)
    distiller = Distiller(
        student,
        options=options,
        total_epochs=len(syntheses) * options.distill_epochs,
        device=device,
        validate=lambda m: pooled_val_auc(cfg, fed, m),
    )
    for synthesis in syntheses:
        adapted = adapt_teachers(
            teachers, synthesis.snapshots, device=device, momentum=options.adapt_momentum
        )
        for _ in range(options.distill_epochs):
            distiller.epoch(teachers, adapted, synthesis)
    result = distiller.result()
    return operating_point(fed, model_scorer(cfg, fed, result.state_dict)), result.best_epoch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished one-shot run directory")
    ap.add_argument("--vary", action="append", default=[], help="key=v1[,v2...] (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep the syntheses here (safetensors) and reuse them on the next invocation",
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    variants = parse_variants(args.vary)
    cfg = load_config(args.run / "config.yaml")
    base = cfg.one_shot.fedisca
    trials: list[tuple[str, FedISCAOptions]] = [("the run's settings", base)]
    for key, value in variants:
        update: dict[str, Any] = {key: value}
        trials.append((f"{key}={value}", FedISCAOptions.model_validate(base.model_dump() | update)))
    fed, _ = load_federation(cfg.data)
    teachers = load_teachers(cfg, fed, args.run)
    sample = fed.sites[0].train.images
    generator = torch_generator(cfg.seed, "fedisca")  # the run's server generator
    key = synthesis_key(cfg, args.run, fed)
    t0 = time.perf_counter()
    syntheses = []
    for r in range(base.rounds):
        cached = None if args.cache is None else load_synthesis(args.cache, r, generator, key=key)
        if cached is None:
            cached = synthesize(
                teachers,
                num_classes=max(2, fed.num_outputs(cfg.task)),
                image_shape=(int(sample.shape[1]), int(sample.shape[2]), int(sample.shape[3])),
                options=base,
                generator=generator,
                device=torch.device("cpu"),
            )
            if args.cache is not None:
                save_synthesis(cached, args.cache, r, generator, key=key)
        syntheses.append(cached)
        print(f"synthesis round {r + 1}/{base.rounds}  {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"synthesis: {base.rounds} rounds in {time.perf_counter() - t0:.0f}s", flush=True)
    run_val = _run_summary_val(args.run)
    ref: OperatingPoint | None = None
    for label, options in trials:
        t1 = time.perf_counter()
        op, best = distil(cfg, fed, options, teachers, syntheses)
        ref = ref or op
        ext_cut = "n/a" if op.ext_acc_cut is None else f"{op.ext_acc_cut:.3f}"
        ext_auc = "n/a" if op.ext_auc is None else f"{op.ext_auc:.3f}"
        print(
            f"{label:>28}: best epoch {best}  val auc {op.val_auc:.3f} acc {op.val_acc:.3f}  "
            f"cut {op.cut:.3f}: val acc {op.val_acc_cut:.3f} external acc {ext_cut}  "
            f"external auc {ext_auc}  (x{op.val_auc / ref.val_auc:.3f} val auc, "
            f"x{op.val_acc_cut / ref.val_acc_cut:.3f} val acc at the cut vs the run's settings)"
            f"  {time.perf_counter() - t1:.0f}s",
            flush=True,
        )
        if label == "the run's settings" and run_val is not None:
            print(f"{'':>28}  the run's summary.json: val auc {run_val:.3f}", flush=True)
    return 0


def _run_summary_val(run_dir: Path) -> float | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    val = json.loads(path.read_text()).get("val") or {}
    auc = val.get("auc")
    return None if auc is None else float(auc)


if __name__ == "__main__":
    raise SystemExit(main())
