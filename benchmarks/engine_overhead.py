"""Engine overhead: medfed's in-process engine vs a plain PyTorch loop doing identical arithmetic.

Workload (issue #2): N clients x M images 1x28x28, conv16-conv32-linear, SGD lr 0.05 (no
momentum), batch 32, 1 local epoch, 5 rounds of FedAvg, evaluation on the pooled validation split
after every round. Both runs draw the same seeds, so they must end with the *same* accuracy; the
printed ratio is medfed wall time / plain-loop wall time in the same process.

    python benchmarks/engine_overhead.py                 # 10x500 and 50x100
    python benchmarks/engine_overhead.py --clients 10 --images 500 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfed.config import build_config  # noqa: E402
from medfed.data.site import ArrayDataset, Federation, Site  # noqa: E402
from medfed.engine import run  # noqa: E402
from medfed.models.factory import create_model  # noqa: E402
from medfed.seeding import derive_seed, torch_generator  # noqa: E402

ROUNDS, LR, BATCH, SEED = 5, 0.05, 32, 0


def make_federation(clients: int, images: int) -> Federation:
    """MNIST-shaped synthetic digits-like data: class-dependent stroke patterns plus noise."""
    sites = []
    for c in range(clients):
        rng = np.random.default_rng(1000 + c)
        n = int(images / 0.8) + 1  # 80% train after the stratified split
        labels = rng.integers(0, 10, n)
        img = rng.normal(60, 45, size=(n, 1, 28, 28))
        for k in range(10):
            sel = labels == k
            img[sel, :, 4 + 2 * k : 6 + 2 * k, 4:24] += 30  # a faint class-specific bar
        data = ArrayDataset(
            torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)), torch.from_numpy(labels)
        )
        sites.append(Site.from_dataset(f"c{c:03d}", data, seed=c))
    return Federation(tuple(sites))


Timing = tuple[float, float]  # (wall seconds, process CPU seconds)


def medfed_run(fed: Federation) -> tuple[Timing, float, dict[str, torch.Tensor]]:
    cfg = build_config(
        {},
        [
            f"federation.rounds={ROUNDS}",
            "federation.min_clients=1",
            "model.name=medfed:tinycnn",
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
        res = run(cfg, out_dir=Path(d) / "run", federation=fed, progress=False)
        acc = float(res.history.last["val_acc"])  # type: ignore[index]
        return (time.perf_counter() - t0, time.process_time() - c0), acc, res.final_params


def new_model() -> torch.nn.Module:
    return create_model("medfed:tinycnn", num_classes=10, in_chans=1, image_size=28)


def train_site(model: torch.nn.Module, site: Site, round_idx: int) -> int:
    """One local epoch of textbook SGD with medfed's per-(round, site) seeds; returns n."""
    torch.manual_seed(derive_seed(SEED, "torch", round_idx, site.name))
    g = torch_generator(SEED, "train", round_idx, site.name)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    model.train()
    n = len(site.train)
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, BATCH):
        idx = perm[i : i + BATCH]
        if len(idx) < 2:
            continue
        x = (site.train.images[idx].float() / 255 - 0.5) / 0.25
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), site.train.labels[idx]).backward()
        opt.step()
    return n


@torch.no_grad()
def pooled_accuracy(model: torch.nn.Module, fed: Federation) -> float:
    model.eval()
    correct = seen = 0
    for site in fed.sites:
        x = (site.val.images.float() / 255 - 0.5) / 0.25
        correct += int((model(x).argmax(1) == site.val.labels).sum())
        seen += len(site.val)
    return correct / seen


def plain_run(fed: Federation) -> tuple[Timing, float, dict[str, torch.Tensor]]:
    """Textbook FedAvg in plain PyTorch: same seeds, same batches, same evaluation each round."""
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(derive_seed(SEED, "init"))
    model = new_model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    acc = float("nan")
    for r in range(ROUNDS):
        states, weights = [], []
        for site in fed.sites:
            model.load_state_dict(global_state)
            n = train_site(model, site, r)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(n)
        total = sum(weights)
        global_state = {
            k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=False)).to(
                global_state[k].dtype
            )
            for k in global_state
        }
        model.load_state_dict(global_state)
        acc = pooled_accuracy(model, fed)
    return (time.perf_counter() - t0, time.process_time() - c0), acc, global_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--images", type=int, nargs="*", default=[500, 100])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for clients, images in zip(args.clients, args.images, strict=False):
        fed = make_federation(clients, images)
        plain_run(fed)  # warm-up (allocator, kernels)
        ours, ref, accs, diff = [], [], set(), 0.0
        for _ in range(args.repeats):
            t_ref, acc_ref, p_ref = plain_run(fed)
            t_ours, acc_ours, p_ours = medfed_run(fed)
            ref.append(t_ref)
            ours.append(t_ours)
            accs.add((round(acc_ref, 6), round(acc_ours, 6)))
            diff = max(diff, max(float((p_ref[k] - p_ours[k]).abs().max()) for k in p_ref))
        # Each medfed run is paired with the plain run just before it; the median of the pair
        # ratios is robust to the slow drifts of a shared VM. CPU time ignores stolen time.
        wall = statistics.median(o[0] / r[0] for o, r in zip(ours, ref, strict=True))
        cpu = statistics.median(o[1] / r[1] for o, r in zip(ours, ref, strict=True))
        print(
            f"{clients:>3} clients x {images} images: plain {statistics.median(r[0] for r in ref):.2f}s"
            f"  medfed {statistics.median(o[0] for o in ours):.2f}s  ratio wall {wall:.3f}"
            f"  cpu {cpu:.3f}  final acc plain/medfed {sorted(accs)}  max |param diff| {diff:.2e}"
        )


if __name__ == "__main__":
    main()
