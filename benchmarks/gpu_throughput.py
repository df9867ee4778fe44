"""GPU training throughput: medfed's federated round vs a plain timm training loop.

Issue #3's target: on one H100 every lee2021 network trains at >= 85% of the images/s of a plain
timm loop (batch 128, bf16 autocast, channels_last, 224 px, SGD with momentum) on the same GPU.

The reference loop holds pre-normalised float batches on the GPU and does nothing but
forward/backward/step. medfed runs whole FedAvg rounds through the engine's in-process runtime:
six sites of GPU-resident uint8 images, per-image normalisation and flip augmentation on the
device, a fresh local optimizer per site and round, update validation and FedAvg aggregation on
the device. The ratio printed is medfed images/s / plain images/s, both measured in this process.

    python benchmarks/gpu_throughput.py                       # the five lee2021 networks
    python benchmarks/gpu_throughput.py --networks resnet50 --rounds 3
    python benchmarks/gpu_throughput.py --device cpu --image-size 32 --batch-size 8 \\
        --networks resnet10t --site-images 16 --steps 2    # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfed.algorithms import STRATEGIES, FederationContext  # noqa: E402
from medfed.algorithms.base import read_params  # noqa: E402
from medfed.client.train import TrainOptions  # noqa: E402
from medfed.data.site import ArrayDataset  # noqa: E402
from medfed.models.factory import create_model  # noqa: E402
from medfed.runtime.inprocess import InProcessRuntime  # noqa: E402
from medfed.types import Update  # noqa: E402
from medfed.validation import validate_update  # noqa: E402

LEE2021 = {
    "VGG19": "vgg19_bn",
    "ResNet50": "resnet50",
    "ResNeXt50": "resnext50_32x4d",
    "SE-ResNet50": "seresnet50",
    "SE-ResNeXt50": "seresnext50_32x4d",
}
# A plain timm loop measured on an H100 at batch 128, bf16, 224 px (issue #3), images/s.
ISSUE_REFERENCE = {
    "resnet50": 3744,
    "vgg19_bn": 2685,
    "resnext50_32x4d": 3005,
    "seresnet50": 2614,
    "seresnext50_32x4d": 2231,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=2, in_chans=1, image_size=size)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def plain_loop(name: str, *, size: int, batch: int, steps: int, device: torch.device) -> float:
    """images/s of the textbook loop: fixed float batches on the device, bf16 autocast."""
    model = _model(name, size, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(3, steps // 5)):  # warm-up: cuDNN autotuning, allocator
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def medfed_rounds(
    name: str,
    *,
    size: int,
    batch: int,
    sites: int,
    site_images: int,
    rounds: int,
    device: torch.device,
) -> float:
    """images/s of whole FedAvg rounds through the engine's runtime, validation and aggregation."""
    model = _model(name, size, device)
    g = torch.Generator().manual_seed(0)
    data = {
        f"site{i}": ArrayDataset(
            images=torch.randint(
                0, 256, (site_images, 1, size, size), dtype=torch.uint8, generator=g
            ),
            labels=torch.randint(0, 2, (site_images,), generator=g),
        )
        for i in range(sites)
    }
    opts = TrainOptions(batch_size=batch, lr=0.01, momentum=0.9, weight_decay=1e-4, amp=True)
    algorithm = STRATEGIES.create("fedavg", {})
    global_params = read_params(model)
    state = algorithm.init(global_params, context=FederationContext(model=model, sites=tuple(data)))
    runtime = InProcessRuntime(
        model=model, algorithm=algorithm, data=data, opts=opts, device=device, seed=0
    )

    def one_round(r: int) -> int:
        nonlocal global_params, state
        outcomes = runtime.execute(r, list(data), global_params, algorithm.payload(state))
        updates = [o for o in outcomes if isinstance(o, Update)]
        if len(updates) != len(outcomes):
            raise RuntimeError(f"a site failed: {outcomes}")
        for u in updates:
            reason = validate_update(u, global_params, expected_keys=None, max_relative_norm=10.0)
            if reason:
                raise RuntimeError(reason)
        global_params, state = algorithm.aggregate(global_params, updates, state, round_idx=r)
        return sum(u.num_examples for u in updates)

    one_round(0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    seen = sum(one_round(r) for r in range(1, rounds + 1))
    _sync(device)
    return seen / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--networks", nargs="*", default=list(LEE2021.values()), help="timm names")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="timed steps of the plain loop")
    ap.add_argument("--sites", type=int, default=6)
    ap.add_argument("--site-images", type=int, default=1280, help="training images per site")
    ap.add_argument("--rounds", type=int, default=2, help="timed FedAvg rounds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or pass --device cpu for a smoke run)")
        return 0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {where}; {args.image_size} px, batch {args.batch_size}, bf16 autocast on CUDA; "
        f"medfed: {args.sites} sites x {args.site_images} images, {args.rounds} timed rounds"
    )
    print(f"{'network':<20}{'plain img/s':>13}{'medfed img/s':>14}{'ratio':>8}{'issue ref':>11}")
    for name in args.networks:
        plain = plain_loop(
            name, size=args.image_size, batch=args.batch_size, steps=args.steps, device=device
        )
        ours = medfed_rounds(
            name,
            size=args.image_size,
            batch=args.batch_size,
            sites=args.sites,
            site_images=args.site_images,
            rounds=args.rounds,
            device=device,
        )
        ref = ISSUE_REFERENCE.get(name)
        print(
            f"{name:<20}{plain:>13.0f}{ours:>14.0f}{ours / plain:>8.3f}"
            + (f"{ref:>11d}" if ref else f"{'-':>11}"),
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
