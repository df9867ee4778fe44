"""HE overhead: one CKKS-encrypted FedAvg round vs plaintext FedAvg, time and bytes (issue #6).

For each model, N sites upload the model's state perturbed by N(0, 0.01^2) noise (and distinct
BatchNorm step counters), with 120, 80, 200, ... examples. The plaintext reference is medfed's
``fedavg_aggregate`` (float64, cast back), timed in this process (median of ``--repeats``). The
encrypted round is :func:`medfed.privacy.he.he_fedavg` with the default CKKS parameters
(N = 8192, primes 60|40|40|60, scale 2^40): every site encrypts its whole update (measured in
full, no extrapolation), the aggregator sums with the public context, one site decrypts.

Round time in a real federation: the sites encrypt in parallel, so it is encrypt per site +
aggregate + decrypt, against the plaintext aggregation alone; the ratio is printed both for that
round and for the aggregation step alone. Bytes: per site, up (the update) and down (the
encrypted aggregate, which every site receives; in clear that is the new global model).

    python benchmarks/he_overhead.py                                   # smallcnn, resnet50, 3 sites
    python benchmarks/he_overhead.py --models smallcnn --sites 5 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import tenseal as ts
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfed.algorithms.aggregate import fedavg_aggregate  # noqa: E402
from medfed.models.factory import create_model  # noqa: E402
from medfed.privacy.he import HEOptions, he_fedavg, setup_keys  # noqa: E402
from medfed.types import ParamKind, Params, Update, params_nbytes  # noqa: E402

# name -> (factory name, image size); all binary classifiers of grayscale images.
MODELS = {
    "tinycnn": ("medfed:tinycnn", 28),
    "smallcnn": ("medfed:smallcnn", 64),
    "resnet50": ("timm:resnet50", 64),
}
COUNTS = (120, 80, 200, 60, 150)


def make_round(model: str, sites: int) -> tuple[Params, list[Update]]:
    name, size = MODELS[model]
    torch.manual_seed(0)
    net = create_model(name, num_classes=2, in_chans=1, image_size=size)
    global_params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    updates = []
    for i in range(sites):
        params = {
            k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            if v.is_floating_point()
            else v + 10 + i
            for k, v in global_params.items()
        }
        updates.append(
            Update(f"site{i}", params, ParamKind.WEIGHTS, COUNTS[i % len(COUNTS)] + i // 5)
        )
    return global_params, updates


def plaintext_fedavg_s(global_params: Params, updates: list[Update], repeats: int) -> float:
    fedavg_aggregate(global_params, updates, None)  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fedavg_aggregate(global_params, updates, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plaintext_best_s(
    global_params: Params, updates: list[Update], repeats: int
) -> tuple[float, dict[int, float]]:
    """Plaintext FedAvg at 1 thread and at torch's default count; the faster one is the reference.

    On a shared 2-core VM torch's 2-thread pool can be many times slower than 1 thread on small
    tensors (the threads wait for a core); taking the faster keeps the HE ratio conservative.
    """
    default = torch.get_num_threads()
    by_threads = {}
    try:
        for n in sorted({1, default}):
            torch.set_num_threads(n)
            by_threads[n] = plaintext_fedavg_s(global_params, updates, repeats)
    finally:
        torch.set_num_threads(default)
    return min(by_threads.values()), by_threads


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def bench(model: str, sites: int, repeats: int) -> dict[str, float]:
    global_params, updates = make_round(model, sites)
    numel = sum(v.numel() for v in global_params.values() if v.is_floating_point())
    plain_s, plain_by_threads = plaintext_best_s(global_params, updates, repeats)
    reference = fedavg_aggregate(global_params, updates, None)

    t0 = time.perf_counter()
    keys = setup_keys(HEOptions())
    keygen_s = time.perf_counter() - t0
    # TenSEAL is single-threaded here; torch's own small ops in the round (flatten, cast) get one
    # thread too, for the reason given in plaintext_best_s.
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c0 = time.process_time()
        result, stats = he_fedavg(global_params, updates, keys=keys, expected_keys=None)
        he_cpu_s = time.process_time() - c0
    finally:
        torch.set_num_threads(default_threads)
    err = max(
        float((result[k].double() - reference[k].double()).abs().max())
        for k, v in global_params.items()
        if v.is_floating_point()
    )
    exact = all(
        torch.equal(result[k], reference[k])
        for k, v in global_params.items()
        if not v.is_floating_point()
    )
    same = sum(
        int((result[k] == reference[k]).sum())
        for k, v in global_params.items()
        if v.is_floating_point()
    )
    enc_site = stats.encrypt_s / sites
    he_round = enc_site + stats.aggregate_s + stats.decrypt_s
    out = {
        "params": float(numel),
        "plain_up": stats.plaintext_bytes / sites,
        "cipher_up": (stats.bytes_up + stats.clear_bytes_up) / sites,
        "plain_down": float(params_nbytes(global_params)),
        "cipher_down": float(stats.aggregate_bytes + stats.clear_bytes_up / sites),
        "expansion": stats.expansion,
        "chunks": float(stats.chunks_per_site),
        "encrypt_site_s": enc_site,
        "aggregate_s": stats.aggregate_s,
        "decrypt_s": stats.decrypt_s,
        "plain_s": plain_s,
        "ratio_round": he_round / plain_s,
        "ratio_agg": stats.aggregate_s / plain_s,
        "he_cpu_s": he_cpu_s,
        "keygen_s": keygen_s,
        "public_context": float(len(keys.public_context)),
        "secret_context": float(len(keys.secret_context)),
        "max_abs_err": err,
        "counters_exact": float(exact),
        "bit_identical": same / numel,
    }
    print(
        f"{model}: {numel:,} floats -> {stats.chunks_per_site:,} chunks/site;"
        f" up/site {fmt_bytes(out['plain_up'])} clear, {fmt_bytes(out['cipher_up'])} encrypted"
        f" (x{stats.expansion:.1f}); down/site {fmt_bytes(out['plain_down'])} clear,"
        f" {fmt_bytes(out['cipher_down'])} encrypted; per round ({sites} sites, up + down)"
        f" {fmt_bytes(sites * (out['plain_up'] + out['plain_down']))} clear,"
        f" {fmt_bytes(sites * (out['cipher_up'] + out['cipher_down']))} encrypted",
        flush=True,
    )
    print(
        f"{model}: encrypt {enc_site:.2f} s/site (all {sites} sites {stats.encrypt_s:.2f} s),"
        f" aggregate {stats.aggregate_s:.2f} s, decrypt {stats.decrypt_s:.2f} s,"
        f" plaintext FedAvg {plain_s:.4f} s (by torch threads: "
        + ", ".join(f"{n}: {t:.4f} s" for n, t in plain_by_threads.items())
        + f"); HE process CPU {he_cpu_s:.1f} s;"
        f" keygen {keygen_s:.3f} s, public context {fmt_bytes(out['public_context'])},"
        f" secret context {fmt_bytes(out['secret_context'])}",
        flush=True,
    )
    print(
        f"{model}: max |HE - plaintext| {err:.2e} over the floats ({100 * same / numel:.1f} %"
        f" bit-identical after the cast to the model's dtype); integer buffers"
        f" {'identical' if exact else 'DIFFERENT'}",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=["smallcnn", "resnet50"]
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="plaintext FedAvg timings")
    args = parser.parse_args(argv)
    if args.sites < 1:
        parser.error("--sites must be >= 1")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), tenseal {ts.__version__},"
        f" {args.sites} sites, CKKS N=8192 primes 60|40|40|60 scale 2^40"
    )
    rows = [(m, bench(m, args.sites, args.repeats)) for m in args.models]
    print(
        "model params plain_up_B cipher_up_B expansion encrypt_s/site aggregate_s decrypt_s"
        " plain_fedavg_s ratio_round ratio_aggregate max_abs_err"
    )
    for m, r in rows:
        print(
            f"{m} {r['params']:.0f} {r['plain_up']:.0f} {r['cipher_up']:.0f} {r['expansion']:.1f}"
            f" {r['encrypt_site_s']:.3f} {r['aggregate_s']:.3f} {r['decrypt_s']:.3f}"
            f" {r['plain_s']:.5f} {r['ratio_round']:.1f} {r['ratio_agg']:.1f}"
            f" {r['max_abs_err']:.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
