"""Segmentation engine overhead: medfed's in-process FedAvg vs plain PyTorch + MONAI doing the same
arithmetic on the synthetic H&E federation.

Workload: S sites of 64 px H&E tiles, ``medfed:smallunet``, MONAI ``DiceCELoss``, SGD (no
momentum, no augmentation), batch 16, 1 local epoch, R rounds of FedAvg, and after every round
the pooled validation Dice from per-image confusion counts (medfed) or from the arg-max masks
directly (plain). Both draw the same seeds, so they must end with the same parameters and Dice;
the printed ratio is medfed wall time / plain wall time in the same process.

    python benchmarks/seg_overhead.py                    # 3 sites, tiles_scale 0.25, 3 rounds
    python benchmarks/seg_overhead.py --sites 5 --scale 0.5 --rounds 3 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfed.config import build_config  # noqa: E402
from medfed.data.site import Federation  # noqa: E402
from medfed.data.synthetic.histology import (  # noqa: E402
    HistologyOptions,
    synthesize_histology_federation,
)
from medfed.engine import run  # noqa: E402
from medfed.models.factory import create_model  # noqa: E402
from medfed.seeding import derive_seed, torch_generator  # noqa: E402

LR, BATCH, SEED = 0.05, 16, 0
Timing = tuple[float, float]  # (wall seconds, process CPU seconds)


def medfed_run(fed: Federation, rounds: int) -> tuple[Timing, float, dict[str, torch.Tensor]]:
    cfg = build_config(
        {},
        [
            "task=segmentation",
            f"federation.rounds={rounds}",
            "federation.min_clients=1",
            "model.name=medfed:smallunet",
            f"train.batch_size={BATCH}",
            f"train.lr={LR}",
            "train.momentum=0",
            "train.augment=false",
            "train.normalize=fixed",
            "device=cpu",
            f"seed={SEED}",
        ],
    )
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        res = run(cfg, out_dir=Path(d) / "run", federation=Federation(fed.sites), progress=False)
        dice = float(res.history.last["val"]["dice"])  # type: ignore[index]
        return (time.perf_counter() - t0, time.process_time() - c0), dice, res.final_params


def _input(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - 0.5) / 0.25


def plain_run(fed: Federation, rounds: int) -> tuple[Timing, float, dict[str, torch.Tensor]]:
    """Textbook FedAvg with MONAI's loss: same seeds, same batches, Dice after every round."""
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(derive_seed(SEED, "init"))
    model = create_model("medfed:smallunet", num_classes=2, in_chans=3, image_size=64)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    dice = float("nan")
    for r in range(rounds):
        states, weights = [], []
        for site in fed.sites:
            model.load_state_dict(global_state)
            torch.manual_seed(derive_seed(SEED, "torch", r, site.name))
            g = torch_generator(SEED, "train", r, site.name)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
            model.train()
            n = len(site.train)
            perm = torch.randperm(n, generator=g)
            seen = 0
            for i in range(0, n, BATCH):
                idx = perm[i : i + BATCH]
                if len(idx) < 2:
                    break
                y = site.train.masks[idx].long().unsqueeze(1)  # type: ignore[index]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(_input(site.train.images[idx])).float(), y).backward()
                opt.step()
                seen += len(idx)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(seen)
        total = sum(weights)
        global_state = {
            k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
                global_state[k].dtype
            )
            for k in global_state
        }
        model.load_state_dict(global_state)
        model.eval()
        tp = fp_fn = 0
        with torch.no_grad():
            for site in fed.sites:
                for i in range(0, len(site.val), 256):
                    pred = model(_input(site.val.images[i : i + 256])).argmax(1).bool()
                    truth = site.val.masks[i : i + 256].bool()  # type: ignore[index]
                    tp += int((pred & truth).sum())
                    fp_fn += int((pred ^ truth).sum())
        dice = 2 * tp / (2 * tp + fp_fn)
    return (time.perf_counter() - t0, time.process_time() - c0), dice, global_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.25, help="histology tiles_scale")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    fed = synthesize_histology_federation(
        HistologyOptions(
            image_size=args.image_size, tiles_scale=args.scale, num_sites=args.sites, external=False
        )
    )
    tiles = sum(len(s.train) for s in fed.sites)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {tiles} training tiles")
    ours, ref, dice, diff = [], [], set(), 0.0
    for _ in range(args.repeats):
        t_ref, d_ref, p_ref = plain_run(fed, args.rounds)
        t_ours, d_ours, p_ours = medfed_run(fed, args.rounds)
        ref.append(t_ref)
        ours.append(t_ours)
        dice.add((round(d_ref, 6), round(d_ours, 6)))
        diff = max(diff, max(float((p_ref[k] - p_ours[k]).abs().max()) for k in p_ref))
    wall = statistics.median(o[0] / r[0] for o, r in zip(ours, ref, strict=True))
    cpu = statistics.median(o[1] / r[1] for o, r in zip(ours, ref, strict=True))
    print(
        f"{args.sites} sites x {tiles // args.sites} tiles: plain "
        f"{statistics.median(r[0] for r in ref):.2f}s  medfed "
        f"{statistics.median(o[0] for o in ours):.2f}s  ratio wall {wall:.3f}  cpu {cpu:.3f}  "
        f"final Dice plain/medfed {sorted(dice)}  max |param diff| {diff:.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
