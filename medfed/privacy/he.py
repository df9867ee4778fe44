"""CKKS-encrypted FedAvg (issue #6): the aggregator sums updates it cannot read.

Protocol, with TenSEAL's CKKS scheme:

1. **Setup, once** (:func:`setup_keys`): the sites agree on one CKKS key pair. The *secret*
   context (with the secret key) stays at the sites; the *public* context (parameters and public
   key only -- no secret key, no Galois or relinearization keys) is all the aggregator gets.
2. **Each site** (:func:`encrypt_params`) flattens its floating-point tensors (sorted by name, in
   float64) into one vector, cuts it into chunks of ``slots = poly_modulus_degree // 2`` values
   and encrypts each chunk with the public key.
3. **The aggregator** (:func:`aggregate_encrypted`) checks that every site sent the same layout
   and computes ``sum_i (n_i / sum_j n_j) * enc_i`` chunk by chunk: ciphertext additions and
   multiplications by *plaintext* scalars, which need neither Galois nor relinearization keys.
4. **A site** (:func:`decrypt_aggregate`) decrypts the aggregate with the secret key.

What the aggregator still sees, by design: each site's example count (the weights are plaintext),
the names and shapes of the tensors, the ciphertext sizes, and tensors that are not floating point
(BatchNorm's ``num_batches_tracked``, averaged in clear by :func:`he_fedavg`). Threat model: an
honest-but-curious aggregator that does not collude with a site. Every site holds the same secret
key, so sites are trusted not to eavesdrop on each other's uploads; removing that (threshold or
multi-key CKKS) is out of scope. Not covered either: CKKS decryptions are approximate and leak
noise, so a party that sees both ciphertexts and their decryptions can attack the key (Li &
Micciancio, 2021). Here the aggregator never sees a decryption directly, but if the decrypted
global model is handed back to it, noise flooding before release would be needed.

Precision, measured with the default parameters (N = 8192, scale 2^40): fresh encryption adds
about 1e-8 absolute error per value, independent of its magnitude, so the aggregate of values of
order one is within ~1e-8 of the float64 FedAvg (tests assert <= 1e-6 absolute and < 1e-4
relative). TenSEAL rescales after each plaintext multiplication by a prime ``q`` close to, but not
equal to, 2^40 and then labels the result with scale 2^40 again; left alone this biases every
aggregate by ``2^40 / q - 1`` (1.3e-7 relative with the default primes, in the same direction
every round). The aggregator multiplies by ``w_i * q / 2^40`` instead of ``w_i``, which removes
the bias exactly; the public context holds ``q``.

Cost: one ciphertext per 4,096 values, ~330 kB serialized (float32 would be 16 kB), so uploads
grow ~20x; per chunk ~9 ms to encrypt, ~2.6 ms per site to aggregate, ~3.3 ms to decrypt, on one
core (TenSEAL holds the GIL, so threads do not help): ~260x plaintext FedAvg per round, for the
small CNN and ResNet50 alike. Figures in ``benchmarks/README.md`` (``benchmarks/he_overhead.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  (registers SEAL's Modulus type, needed to read the primes)
import torch

from medfed.algorithms.aggregate import (
    as_weights,
    cast_like,
    merge,
    prepare_updates,
    to_compute,
    weighted_mean,
)
from medfed.privacy.config import HEOptions
from medfed.types import Params, Update, params_nbytes

__all__ = [
    "EncryptedAggregate",
    "EncryptedUpdate",
    "HEKeys",
    "HEOptions",
    "HERoundStats",
    "Layout",
    "TensorSpec",
    "ContextInfo",
    "aggregate_encrypted",
    "context_info",
    "decrypt_aggregate",
    "encrypt_params",
    "he_fedavg",
    "public_context_of",
    "setup_keys",
]


@dataclass(frozen=True)
class HEKeys:
    """The output of the sites' setup step; only ``public_context`` ever leaves a site."""

    secret_context: bytes
    public_context: bytes


def setup_keys(options: HEOptions | None = None) -> HEKeys:
    """Generate the federation's CKKS key pair (run once, at one site, shared among the sites).

    Neither Galois keys (rotations) nor relinearization keys (ciphertext x ciphertext products)
    are serialized: weighted sums never need them, and leaving them out keeps the public context
    small and the aggregator's capabilities minimal.
    """
    opts = options or HEOptions()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=opts.poly_modulus_degree,
        coeff_mod_bit_sizes=list(opts.coeff_mod_bit_sizes),
        n_threads=1,  # TenSEAL only parallelises CKKSTensor ops; CKKSVector work is serial
    )
    ctx.global_scale = float(2**opts.global_scale_bits)
    public = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    secret = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return HEKeys(secret_context=secret, public_context=public)


# --- contexts ---


def _load_context(data: bytes, *, role: str) -> ts.Context:
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"{role}: expected a serialized TenSEAL context (bytes), got {type(data)}")
    try:
        return ts.context_from(bytes(data), n_threads=1)
    except Exception as exc:  # TenSEAL raises assorted C++ errors for a bad buffer
        raise ValueError(f"{role}: not a serialized TenSEAL context ({exc})") from exc


def public_context_of(secret_context: bytes) -> bytes:
    """The public context a site's secret context belongs to: the same bytes
    :func:`setup_keys` wrote (serialization is deterministic), so sites that share a key pair
    present identical public contexts without having kept the public file."""
    ctx = _load_context(secret_context, role="secret context")
    return bytes(
        ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def _params(ctx: ts.Context) -> tuple[int, list[int]]:
    """(slots, data primes of the top level) of a CKKS context."""
    parms = ctx.seal_context().data.first_context_data().parms()
    primes = [m.value() for m in parms.coeff_modulus()]
    return parms.poly_modulus_degree() // 2, primes


def _max_abs(ctx: ts.Context) -> float:
    """Largest |value| that survives one rescale: value * scale must stay below half of the
    remaining modulus (with a factor 4 of headroom for the noise and the weighted sum)."""
    _, primes = _params(ctx)
    remaining_bits = sum(math.log2(p) for p in primes[:-1])
    return float(2.0 ** (remaining_bits - math.log2(ctx.global_scale) - 3))


@dataclass(frozen=True)
class ContextInfo:
    """What a serialized context commits to, in :class:`HEOptions`' terms (for comparing a
    context made by the setup step with a run's config, and for checking who may decrypt)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale_bits: int
    private: bool  # holds the secret key

    def matches(self, options: HEOptions) -> bool:
        return (
            self.poly_modulus_degree == options.poly_modulus_degree
            and list(self.coeff_mod_bit_sizes) == list(options.coeff_mod_bit_sizes)
            and self.global_scale_bits == options.global_scale_bits
        )


def context_info(data: bytes, *, role: str = "context") -> ContextInfo:
    ctx = _load_context(data, role=role)
    parms = ctx.seal_context().data.key_context_data().parms()
    return ContextInfo(
        poly_modulus_degree=int(parms.poly_modulus_degree()),
        coeff_mod_bit_sizes=tuple(int(m.value()).bit_length() for m in parms.coeff_modulus()),
        global_scale_bits=round(math.log2(ctx.global_scale)),
        private=bool(ctx.is_private()),
    )


# --- layout ---


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """How a ``Params`` dict becomes one vector: floating tensors, sorted by name, flattened.

    Sorting makes the layout independent of dict order, so that sites with the same model agree
    without coordinating. Non-floating tensors (integer counters, masks) are not encrypted: CKKS
    is approximate, and an average of counts is rounded in clear anyway. Their names are kept in
    ``unencrypted`` so that sites must agree on them too.
    """

    tensors: tuple[TensorSpec, ...]
    unencrypted: tuple[str, ...] = ()

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> Layout:
        specs, skipped = [], []
        for name in sorted(params):
            t = params[name]
            if t.is_floating_point():
                specs.append(TensorSpec(name, tuple(t.shape), t.dtype))
            else:
                skipped.append(name)
        return cls(tuple(specs), tuple(skipped))

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.tensors)

    def num_chunks(self, slots: int) -> int:
        return -(-self.numel // slots)

    def flatten(self, params: Mapping[str, torch.Tensor]) -> np.ndarray:
        """All floating tensors, in layout order, as one float64 vector on the CPU."""
        if not self.tensors:
            return np.zeros(0, dtype=np.float64)
        parts = [to_compute(params[s.name]).cpu().reshape(-1) for s in self.tensors]
        return torch.cat(parts).numpy()

    def unflatten(self, flat: np.ndarray) -> Params:
        """Inverse of :meth:`flatten`: tensors of the layout's shapes and dtypes, on the CPU."""
        if flat.shape != (self.numel,):
            raise ValueError(f"expected {self.numel} values, got {flat.shape}")
        out: Params = {}
        start = 0
        data = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float64))
        for s in self.tensors:
            out[s.name] = data[start : start + s.numel].reshape(s.shape).to(s.dtype)
            start += s.numel
        return out

    def difference(self, other: Layout) -> str | None:
        """A human-readable first difference from ``other``, or None when they agree."""
        if self == other:
            return None
        mine, theirs = {s.name: s for s in self.tensors}, {s.name: s for s in other.tensors}
        if set(mine) != set(theirs):
            return (
                f"missing {sorted(set(theirs) - set(mine))[:5]}, "
                f"extra {sorted(set(mine) - set(theirs))[:5]}"
            )
        for name, s in mine.items():
            o = theirs[name]
            if s.shape != o.shape:
                return f"{name!r} has shape {s.shape}, expected {o.shape}"
            if s.dtype != o.dtype:
                return f"{name!r} has dtype {s.dtype}, expected {o.dtype}"
        return f"unencrypted tensors {list(self.unencrypted)}, expected {list(other.unencrypted)}"


# --- messages ---


@dataclass(frozen=True)
class EncryptedUpdate:
    """What a site uploads: its example count and layout in clear, its values as CKKS chunks."""

    site: str
    num_examples: int
    layout: Layout
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class EncryptedAggregate:
    """The encrypted weighted mean, as the aggregator sends it back to the sites."""

    sites: tuple[str, ...]
    num_examples: int
    layout: Layout
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


# --- the three steps ---


def encrypt_params(
    params: Mapping[str, torch.Tensor], *, context: bytes, site: str, num_examples: int
) -> EncryptedUpdate:
    """Encrypt ``params``' floating tensors at a site; the public context is enough.

    Values are taken in float64 (no rounding beyond the stored dtype's) and packed across tensor
    boundaries, so only the last chunk is partly empty. Non-finite values and values too large
    for the modulus are refused: CKKS would silently turn them into garbage.
    """
    if num_examples < 0:
        raise ValueError(f"site {site!r}: num_examples must be >= 0, got {num_examples}")
    ctx = _load_context(context, role=f"site {site!r}")
    slots, _ = _params(ctx)
    layout = Layout.of(params)
    flat = layout.flatten(params)
    limit = _max_abs(ctx)
    if flat.size and not (np.isfinite(flat).all() and float(np.abs(flat).max()) <= limit):
        for s in layout.tensors:
            v = to_compute(params[s.name])
            if not bool(torch.isfinite(v).all()) or float(v.abs().max()) > limit:
                raise ValueError(
                    f"site {site!r}: {s.name!r} holds non-finite values or values beyond "
                    f"+-{limit:.3g}, which CKKS with these parameters cannot encrypt"
                )
    chunks = tuple(
        ts.ckks_vector(ctx, flat[i : i + slots].tolist()).serialize()
        for i in range(0, flat.size, slots)
    )
    return EncryptedUpdate(site=site, num_examples=num_examples, layout=layout, chunks=chunks)


def _check_updates(updates: Sequence[EncryptedUpdate], slots: int) -> list[EncryptedUpdate]:
    if not updates:
        raise ValueError("no encrypted updates to aggregate")
    sites = [u.site for u in updates]
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites among encrypted updates: {sorted(sites)}")
    ups = sorted(updates, key=lambda u: u.site)
    ref = ups[0]
    for u in ups:
        diff = u.layout.difference(ref.layout)
        if diff is not None:
            raise ValueError(
                f"encrypted update from {u.site!r} has a different layout than {ref.site!r}: {diff}"
            )
        expected = ref.layout.num_chunks(slots)
        if len(u.chunks) != expected:
            raise ValueError(
                f"encrypted update from {u.site!r} has {len(u.chunks)} chunks, expected "
                f"{expected} ({ref.layout.numel} values, {slots} per chunk)"
            )
        if u.num_examples < 0:
            raise ValueError(f"encrypted update from {u.site!r} has negative num_examples")
    if sum(u.num_examples for u in ups) <= 0:
        raise ValueError("num_examples sum to zero: no weights to average with")
    return ups


def aggregate_encrypted(
    updates: Sequence[EncryptedUpdate], *, public_context: bytes
) -> EncryptedAggregate:
    """The aggregator's step: ``sum_i (n_i / sum_j n_j) * enc_i``, never seeing a value.

    Refuses a context that holds a secret key: an aggregator that could decrypt would void the
    whole point, and accepting one "because it works" would hide a key-distribution mistake.
    Ciphertext sums are exact modular arithmetic, so the result does not depend on the order the
    updates arrive in (they are sorted by site anyway, as in plaintext FedAvg).
    """
    ctx = _load_context(public_context, role="aggregator")
    if ctx.has_secret_key() or ctx.is_private():
        raise ValueError(
            "the aggregator must never hold the secret key: pass HEKeys.public_context, "
            "not the sites' secret context"
        )
    slots, primes = _params(ctx)
    ups = _check_updates(updates, slots)
    layout = ups[0].layout
    total = sum(u.num_examples for u in ups)
    # See the module docstring: undo TenSEAL's rescale by q while labelling the scale 2^40.
    correction = primes[-1] / ctx.global_scale
    weighted = [(u, u.num_examples / total * correction) for u in ups if u.num_examples > 0]
    out: list[bytes] = []
    for j in range(layout.num_chunks(slots)):
        size = min(slots, layout.numel - j * slots)
        acc: ts.CKKSVector | None = None
        for u, w in weighted:
            try:
                vec = ts.ckks_vector_from(ctx, u.chunks[j])
            except Exception as exc:
                raise ValueError(f"encrypted update from {u.site!r}: chunk {j}: {exc}") from exc
            if vec.size() != size:
                raise ValueError(
                    f"encrypted update from {u.site!r}: chunk {j} holds {vec.size()} values, "
                    f"expected {size}"
                )
            vec.mul_(w)
            if acc is None:
                acc = vec
            else:
                acc.add_(vec)
        assert acc is not None  # at least one site has a positive weight
        out.append(acc.serialize())
    return EncryptedAggregate(
        sites=tuple(u.site for u in ups), num_examples=total, layout=layout, chunks=tuple(out)
    )


def decrypt_aggregate(agg: EncryptedAggregate, *, secret_context: bytes) -> Params:
    """A site's step: decrypt the aggregate into tensors of the layout's shapes and dtypes (CPU)."""
    ctx = _load_context(secret_context, role="decrypt_aggregate")
    if not ctx.is_private():
        raise ValueError(
            "decrypt_aggregate needs the sites' secret context (HEKeys.secret_context); this "
            "context holds no secret key -- is it the aggregator's public context?"
        )
    slots, _ = _params(ctx)
    if len(agg.chunks) != agg.layout.num_chunks(slots):
        raise ValueError(
            f"aggregate has {len(agg.chunks)} chunks, expected {agg.layout.num_chunks(slots)}"
        )
    parts = [
        np.asarray(ts.ckks_vector_from(ctx, c).decrypt(), dtype=np.float64) for c in agg.chunks
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return agg.layout.unflatten(flat)


# --- the in-process round ---


@dataclass(frozen=True)
class HERoundStats:
    """Cost of one encrypted round, for the benchmark and the run history (wall seconds, bytes)."""

    bytes_up: int  # ciphertext bytes from all sites
    plaintext_bytes: int  # what the same updates weigh in clear, all sites
    encrypt_s: float  # all sites together (they would run in parallel in a real federation)
    aggregate_s: float
    decrypt_s: float  # one site
    aggregate_bytes: int = 0  # the encrypted aggregate, sent back to each site to decrypt
    clear_bytes_up: int = 0  # non-floating tensors sent in clear, all sites
    chunks_per_site: int = 0

    @property
    def expansion(self) -> float:
        """Upload size encrypted / in clear."""
        sent = self.bytes_up + self.clear_bytes_up
        return sent / self.plaintext_bytes if self.plaintext_bytes else math.nan


def he_fedavg(
    global_params: Params,
    updates: Sequence[Update],
    *,
    keys: HEKeys,
    expected_keys: frozenset[str] | None,
) -> tuple[Params, HERoundStats]:
    """FedAvg through the encrypted protocol, all parties in one process (for the simulator).

    Same contract as :func:`medfed.algorithms.aggregate.fedavg_aggregate` -- same validation,
    DELTA updates turned into weights as ``global + delta``, keys outside ``expected_keys`` keep
    the global value, results cast to the global's dtypes and devices -- except that the
    floating-point tensors travel encrypted: each site encrypts with the public context, the
    aggregator sums with the public context only, and one site decrypts. Which tensors are
    floating is decided by the *global* model's dtypes, as :func:`cast_like` decides rounding;
    the others (BatchNorm's ``num_batches_tracked``) are averaged in clear exactly as FedAvg does.
    """
    ups = prepare_updates(global_params, updates, expected_keys)
    keys_sent = sorted(ups[0].params)
    enc_keys = [k for k in keys_sent if global_params[k].is_floating_point()]
    clear_keys = [k for k in keys_sent if not global_params[k].is_floating_point()]
    full = [as_weights(u, global_params) for u in ups]

    t0 = time.perf_counter()
    encrypted = [
        encrypt_params(
            {k: to_compute(w[k]) for k in enc_keys},
            context=keys.public_context,
            site=u.site,
            num_examples=u.num_examples,
        )
        for u, w in zip(ups, full, strict=True)
    ]
    t1 = time.perf_counter()
    agg = aggregate_encrypted(encrypted, public_context=keys.public_context)
    t2 = time.perf_counter()
    decrypted = decrypt_aggregate(agg, secret_context=keys.secret_context)
    t3 = time.perf_counter()

    result: Params = {k: cast_like(decrypted[k], global_params[k]) for k in enc_keys}
    if clear_keys:
        result.update(
            weighted_mean(
                [{k: w[k] for k in clear_keys} for w in full],
                [u.num_examples for u in ups],
                like=global_params,
            )
        )
    stats = HERoundStats(
        bytes_up=sum(e.nbytes for e in encrypted),
        plaintext_bytes=sum(params_nbytes(u.params) for u in ups),
        encrypt_s=t1 - t0,
        aggregate_s=t2 - t1,
        decrypt_s=t3 - t2,
        aggregate_bytes=agg.nbytes,
        clear_bytes_up=sum(params_nbytes({k: u.params[k] for k in clear_keys}) for u in ups),
        chunks_per_site=len(agg.chunks),
    )
    return merge(global_params, result), stats
