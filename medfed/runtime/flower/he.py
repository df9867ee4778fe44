"""``privacy.he`` over Flower: the ServerApp sums CKKS ciphertexts; only the sites hold the key.

Protocol (issue #6), with the algorithm code of :mod:`medfed.privacy.he`:

1. **Setup, once, out of band** (:func:`write_keys`, ``medfed he keys --out DIR``): one site
   makes the federation's CKKS key pair and gives ``he-secret.ctx`` (mode 0600, never overwritten)
   to every site the way SuperNode keys are handed out. A SuperNode finds it through its node
   config ``he-context=PATH`` (or ``$MEDFED_HE_CONTEXT``); without it the site refuses the run.
2. **Discovery**: each site presents the public context its secret context belongs to
   (:func:`~medfed.privacy.he.public_context_of`). The ServerApp keeps it only if every site
   presents the same one, made with the run config's ``privacy.he`` parameters, and it holds no
   secret key (:func:`agreed_public_context`).
3. **Each round**: a site trains as in the plaintext runtime, screens its own update with
   :func:`medfed.validation.validate_update` exactly where the simulator screens it (a NaN or a
   mis-shaped tensor costs the site its round, with the same reason), turns it into full weights
   and encrypts the floating tensors (:func:`seal_update`). What it sends: the ciphertext chunks
   and their layout as uint8 tensors in ``Update.extras["he"]``, integer buffers (BatchNorm's
   ``num_batches_tracked``) in clear as the simulator averages them, and, in clear as always, its
   example count and training metrics. The ledger receipt signs the digest of exactly that
   (ciphertext included), so the coordinator checks it as it checks a plaintext update.
4. **The ServerApp** (:class:`FlowerEncryptedAggregation`) checks each upload's layout, sums the
   ciphertexts weighted by the plaintext example counts
   (:func:`~medfed.privacy.he.aggregate_encrypted`, public context only), and sends the
   encrypted mean to one participating site (the next one if it does not answer), which
   decrypts it (:func:`decrypt_reply`) and returns the plaintext mean.

**What the server learns.** Per site: example count, training metrics, tensor names and shapes,
ciphertext sizes, the integer buffers. Per round: the decrypted *aggregate*, i.e. the new global
model, which the server needs to evaluate, checkpoint and resume -- the same as under SecAgg+ and
in the simulator. No single site's floating-point update reaches the server process in clear.

**Threat model and limits.** An honest-but-curious server that does not collude with a site.
Every site holds the same secret key, so sites are trusted not to read each other's uploads. A
*malicious* server could send one site's ciphertext as an "aggregate" to be decrypted (the
decrypting site cannot tell a sum from a single upload), and it sees both the aggregate
ciphertext and its decryption, which CKKS does not protect against key recovery (Li & Micciancio
2021) without noise flooding; neither is defended here. Norm-based update screens cannot run on
ciphertexts (the simulator turns them off under HE too). Key rotation, threshold decryption and
per-round fresh keys are out of scope.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from medfed.algorithms.aggregate import (
    COMPUTE_DTYPE,
    as_weights,
    cast_like,
    merge,
    to_compute,
    weighted_mean,
)
from medfed.privacy.config import HEOptions
from medfed.privacy.he import (
    EncryptedAggregate,
    EncryptedUpdate,
    Layout,
    TensorSpec,
    aggregate_encrypted,
    context_info,
    decrypt_aggregate,
    encrypt_params,
    public_context_of,
    setup_keys,
)
from medfed.runtime.flower.codec import Key, from_record, to_record
from medfed.types import Params, StrategyState, StrEnum, Update, params_nbytes
from medfed.validation import validate_update

NODE_CONFIG_KEY = "he-context"
"""Node-config key naming a SuperNode's secret context file (``he-secret.ctx``)."""
ENV_VAR = "MEDFED_HE_CONTEXT"
SECRET_FILE = "he-secret.ctx"
PUBLIC_FILE = "he-public.ctx"
GROUP = "he"  # the Update.extras group that carries the ciphertext
DECRYPT_ACTION = "he_decrypt"  # ClientApp query action: message type "query.he_decrypt"
DECRYPT_MESSAGE = f"{MessageType.QUERY}.{DECRYPT_ACTION}"
ENCRYPT_METRIC = "he_encrypt_s"  # a site's encryption time, in its (plaintext) metrics


class HEKey(StrEnum):
    """Record and field names of the HE messages (next to :class:`codec.Key`'s)."""

    PUBLIC = "he-public-context"  # describe: the site's public context (bytes)
    AGGREGATE = "medfed.he.aggregate"  # decrypt request: layout + ciphertext chunks
    AGGREGATE_INFO = "medfed.he.aggregate-info"  # decrypt request: the sites summed
    DECRYPT = "medfed.he.decrypt"  # decrypt reply: seconds spent
    SITES = "sites"
    SECONDS = "decrypt_s"


class HEContextError(RuntimeError):
    """A site's CKKS secret context is missing or unusable (names the node-config key)."""


class HEProtocolError(RuntimeError):
    """The federation's HE setup does not hold (contexts differ, wrong parameters, no key)."""


class UpdateScreened(RuntimeError):
    """The site's own screen refused its update before encryption (the round is lost to it)."""


# --------------------------------------------------------------------------- setup step


@dataclass(frozen=True)
class KeyFiles:
    secret: Path
    public: Path


def write_keys(out_dir: Path, options: HEOptions | None = None) -> KeyFiles:
    """Write ``he-secret.ctx`` (0600, for the sites) and ``he-public.ctx``; never overwrites."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = KeyFiles(out_dir / SECRET_FILE, out_dir / PUBLIC_FILE)
    for p in (files.secret, files.public):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite a CKKS context")
    keys = setup_keys(options)
    fd = os.open(files.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keys.secret_context)
    files.public.write_bytes(keys.public_context)
    return files


# --------------------------------------------------------------------------- wire encoding


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _tensor_bytes(t: torch.Tensor, *, what: str) -> bytes:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    return t.cpu().numpy().tobytes()


def pack(layout: Layout, chunks: Sequence[bytes]) -> Params:
    """Layout (JSON) and ciphertext chunks as uint8 tensors: what travels, and what is signed."""
    spec = {
        "tensors": [
            [s.name, list(s.shape), str(s.dtype).removeprefix("torch.")] for s in layout.tensors
        ],
        "unencrypted": list(layout.unencrypted),
    }
    out = {"layout": _bytes_tensor(json.dumps(spec, sort_keys=True).encode())}
    out.update({f"chunk.{i:06d}": _bytes_tensor(c) for i, c in enumerate(chunks)})
    return out


def unpack(tensors: Mapping[str, torch.Tensor] | None) -> tuple[Layout, tuple[bytes, ...]]:
    """Inverse of :func:`pack`; a ``ValueError`` saying what is malformed."""
    if not tensors or "layout" not in tensors:
        raise ValueError(f"no ciphertext layout (extras group {GROUP!r})")
    try:
        spec = json.loads(_tensor_bytes(tensors["layout"], what="layout"))
        specs = []
        for name, shape, dtype in spec["tensors"]:
            dt = getattr(torch, str(dtype), None)
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
                raise ValueError(f"tensor {name!r}: {dtype!r} is not a floating dtype")
            specs.append(TensorSpec(str(name), tuple(int(x) for x in shape), dt))
        layout = Layout(tuple(specs), tuple(str(x) for x in spec["unencrypted"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable ciphertext layout: {err}") from err
    names = sorted(k for k in tensors if k != "layout")
    expected = [f"chunk.{i:06d}" for i in range(len(names))]
    if names != expected:
        raise ValueError(f"ciphertext chunks {names[:3]}... are not chunk.000000 .. in order")
    return layout, tuple(_tensor_bytes(tensors[n], what=n) for n in names)


def split_keys(
    global_params: Params, expected_keys: Collection[str] | None
) -> tuple[list[str], list[str]]:
    """(encrypted, clear) keys: floating tensors of the global model travel encrypted, as
    :func:`~medfed.privacy.he.he_fedavg` decides."""
    keys = sorted(global_params if expected_keys is None else expected_keys)
    enc = [k for k in keys if global_params[k].is_floating_point()]
    return enc, [k for k in keys if not global_params[k].is_floating_point()]


def expected_layout(global_params: Params, enc_keys: Sequence[str]) -> Layout:
    return Layout(
        tuple(TensorSpec(k, tuple(global_params[k].shape), COMPUTE_DTYPE) for k in enc_keys)
    )


# --------------------------------------------------------------------------- site half


def site_secret_context(node_config: Mapping[str, Any]) -> bytes:
    """The site's secret context, from node config ``he-context`` or ``$MEDFED_HE_CONTEXT``."""
    path = node_config.get(NODE_CONFIG_KEY) or os.environ.get(ENV_VAR)
    if not path:
        raise HEContextError(
            f"privacy.he is on but this SuperNode has no CKKS secret context: start it with "
            f"--node-config \"{NODE_CONFIG_KEY}='PATH'\" naming the {SECRET_FILE} made by "
            f"`medfed he keys` (shared among the sites out of band), or set ${ENV_VAR}"
        )
    file = Path(str(path))
    if not file.is_file():
        raise HEContextError(f"{NODE_CONFIG_KEY}={file}: no such file")
    data = file.read_bytes()
    try:
        info = context_info(data, role=f"{NODE_CONFIG_KEY}={file}")
    except ValueError as err:
        raise HEContextError(str(err)) from err
    if not info.private:
        raise HEContextError(
            f"{NODE_CONFIG_KEY}={file} holds no secret key: give the sites {SECRET_FILE}, "
            f"not {PUBLIC_FILE}"
        )
    return data


def site_contexts(node_config: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(secret, public) context of this site; the public one is what it presents and uses."""
    secret = site_secret_context(node_config)
    return secret, public_context_of(secret)


def seal_update(
    update: Update,
    *,
    global_params: Params,
    expected_keys: Collection[str] | None,
    public_context: bytes,
) -> Update:
    """Screen ``update`` as the simulator's server would, then encrypt it for upload.

    Raises :class:`UpdateScreened` with the screen's reason; nothing is sent then. The result
    keeps the update's kind, count and metrics (plus the encryption time) and its clear
    (non-floating) tensors; the floating tensors, as full weights in float64, are in
    ``extras["he"]`` as ciphertext.
    """
    reason = validate_update(
        update, global_params, expected_keys=expected_keys, max_relative_norm=float("inf")
    )
    if reason is not None:
        raise UpdateScreened(f"site {update.site!r} screened its own update: {reason}")
    enc_keys, clear_keys = split_keys(global_params, expected_keys)
    full = as_weights(update, global_params)
    t0 = time.perf_counter()
    sealed = encrypt_params(
        {k: to_compute(full[k]) for k in enc_keys},
        context=public_context,
        site=update.site,
        num_examples=update.num_examples,
    )
    seconds = time.perf_counter() - t0
    return Update(
        site=update.site,
        params={k: update.params[k] for k in clear_keys},
        kind=update.kind,
        num_examples=update.num_examples,
        metrics={**update.metrics, ENCRYPT_METRIC: seconds},
        extras={GROUP: pack(sealed.layout, sealed.chunks)},
    )


def decrypt_reply(content: RecordDict, *, secret_context: bytes) -> RecordDict:
    """A site's answer to a decrypt request: the plaintext mean (float64) and the time taken."""
    layout, chunks = unpack(from_record(content.array_records[HEKey.AGGREGATE]))
    info = content.config_records.get(HEKey.AGGREGATE_INFO)
    sites = [] if info is None else info.get(HEKey.SITES, [])
    agg = EncryptedAggregate(
        sites=tuple(str(s) for s in sites),  # type: ignore[union-attr]
        num_examples=0,
        layout=layout,
        chunks=chunks,
    )
    t0 = time.perf_counter()
    params = decrypt_aggregate(agg, secret_context=secret_context)
    seconds = time.perf_counter() - t0
    return RecordDict(
        {Key.PARAMS: to_record(params), HEKey.DECRYPT: MetricRecord({HEKey.SECONDS: seconds})}
    )


# --------------------------------------------------------------------------- server half


def agreed_public_context(contexts: Mapping[str, bytes | None], *, options: HEOptions) -> bytes:
    """The one public context all sites presented, checked against the run's ``privacy.he``."""
    missing = sorted(s for s, c in contexts.items() if not c)
    if missing:
        raise HEProtocolError(
            f"privacy.he: site(s) {', '.join(missing)} presented no CKKS public context"
        )
    groups: dict[bytes, list[str]] = {}
    for site, ctx in sorted(contexts.items()):
        groups.setdefault(bytes(ctx or b""), []).append(site)
    if len(groups) > 1:
        parts = "; ".join(", ".join(sites) for sites in groups.values())
        raise HEProtocolError(
            f"privacy.he: the sites hold different CKKS key pairs (same key within each group: "
            f"{parts}); give every site the same {SECRET_FILE} from one `medfed he keys`"
        )
    if not groups:
        raise HEProtocolError("privacy.he: no site presented a CKKS public context")
    public = next(iter(groups))
    info = context_info(public, role="the sites' public context")
    if info.private:
        raise HEProtocolError(
            "privacy.he: the sites presented a context holding the secret key; the server must "
            "only ever receive the public context"
        )
    if not info.matches(options):
        raise HEProtocolError(
            f"privacy.he: the sites' CKKS context has poly_modulus_degree="
            f"{info.poly_modulus_degree}, coeff_mod_bit_sizes={list(info.coeff_mod_bit_sizes)}, "
            f"global_scale_bits={info.global_scale_bits}; the run config asks for "
            f"{options.poly_modulus_degree}, {list(options.coeff_mod_bit_sizes)}, "
            f"{options.global_scale_bits}"
        )
    return public


Send = Callable[[str, int, Sequence[str], Callable[[], RecordDict]], Mapping[str, Message | str]]
"""``FlowerRuntime._exchange``: (message type, round, sites, content) -> reply or why none."""


class FlowerEncryptedAggregation:
    """The ServerApp's half of ``privacy.he``: ``engine.train_loop``'s encrypted merge.

    Holds the public context only (refused otherwise, here and in ``aggregate_encrypted``).
    ``validate`` replaces the plaintext screen for uploads it cannot read; ``aggregate`` sums the
    ciphertexts and has one participating site decrypt the mean.
    """

    def __init__(self, public_context: bytes, *, send: Send, task: Callable[[int], ConfigRecord]):
        info = context_info(public_context, role="aggregator")
        if info.private:
            raise HEProtocolError("the ServerApp must never hold the CKKS secret key")
        self.public_context = public_context
        self.slots = info.poly_modulus_degree // 2
        self.send = send
        self.task = task

    def validate(
        self,
        update: Update,
        global_params: Params,
        *,
        expected_keys: Collection[str] | None,
        max_relative_norm: float,
    ) -> str | None:
        """Why an encrypted upload cannot be summed, or None; the values themselves were
        screened by the site (``max_relative_norm`` cannot apply to a ciphertext)."""
        enc_keys, clear_keys = split_keys(global_params, expected_keys)
        clear = replace(update, extras={})
        reason = validate_update(
            clear, global_params, expected_keys=clear_keys, max_relative_norm=float("inf")
        )
        if reason is not None:
            return reason
        if set(update.extras) != {GROUP}:
            return f"encrypted update: expected extras group {GROUP!r}, got {sorted(update.extras)}"
        try:
            layout, chunks = unpack(update.extras[GROUP])
        except ValueError as err:
            return f"encrypted update: {err}"
        diff = layout.difference(expected_layout(global_params, enc_keys))
        if diff is not None:
            return f"encrypted update: layout differs from the global model's: {diff}"
        if len(chunks) != layout.num_chunks(self.slots):
            return (
                f"encrypted update: {len(chunks)} ciphertext chunks, expected "
                f"{layout.num_chunks(self.slots)}"
            )
        return None

    def aggregate(
        self, global_params: Params, updates: Sequence[Update], state: StrategyState
    ) -> tuple[Params, StrategyState, dict[str, Any]]:
        if not updates:
            raise ValueError("no encrypted updates to aggregate")
        ups = sorted(updates, key=lambda u: u.site)
        # validate() held every upload to the global model's layout and clear keys
        enc_keys = [s.name for s in unpack(ups[0].extras[GROUP])[0].tensors]
        clear_keys = sorted(ups[0].params)
        encrypted = []
        for u in ups:
            layout, chunks = unpack(u.extras[GROUP])
            encrypted.append(
                EncryptedUpdate(
                    site=u.site, num_examples=u.num_examples, layout=layout, chunks=chunks
                )
            )
        t0 = time.perf_counter()
        agg = aggregate_encrypted(encrypted, public_context=self.public_context)
        aggregate_s = time.perf_counter() - t0
        decrypted, info = self._decrypt(agg, state.round)
        result: Params = {k: cast_like(decrypted[k], global_params[k]) for k in enc_keys}
        if clear_keys:
            full = [as_weights(u, global_params) for u in ups]
            result.update(
                weighted_mean(
                    [{k: w[k] for k in clear_keys} for w in full],
                    [u.num_examples for u in ups],
                    like=global_params,
                )
            )
        clear_bytes = sum(params_nbytes(u.params) for u in ups)
        enc_plain = sum(
            global_params[k].numel() * global_params[k].element_size() for k in enc_keys
        )
        sent = sum(e.nbytes for e in encrypted) + clear_bytes
        plain = len(ups) * enc_plain + clear_bytes
        record = {
            "bytes_up": sent,
            "plaintext_bytes": plain,
            "aggregate_bytes": agg.nbytes,
            "expansion": sent / plain if plain else float("nan"),
            "encrypt_s": sum(float(u.metrics.get(ENCRYPT_METRIC, 0.0)) for u in ups),
            "aggregate_s": aggregate_s,
            **info,
        }
        return merge(global_params, result), replace(state, round=state.round + 1), record

    def _decrypt(self, agg: EncryptedAggregate, round_idx: int) -> tuple[Params, dict[str, Any]]:
        """Ask the round's sites, one at a time, to decrypt ``agg``; the first good answer."""
        payload = pack(agg.layout, agg.chunks)

        def content() -> RecordDict:
            return RecordDict(
                {
                    Key.TASK: self.task(round_idx),
                    HEKey.AGGREGATE: to_record(payload),
                    HEKey.AGGREGATE_INFO: ConfigRecord({HEKey.SITES: list(agg.sites)}),
                }
            )

        failures: dict[str, str] = {}
        for site in agg.sites:
            t0 = time.perf_counter()
            reply = self.send(DECRYPT_MESSAGE, round_idx, [site], content)[site]
            if isinstance(reply, str):
                failures[site] = reply
                continue
            try:
                params = from_record(reply.content.array_records[Key.PARAMS])
                problem = _check_decrypted(params, agg.layout)
                seconds = float(reply.content.metric_records[HEKey.DECRYPT][HEKey.SECONDS])  # type: ignore[arg-type]
            except (KeyError, ValueError, TypeError) as err:
                problem = f"malformed reply: {err}"
            if problem is not None:
                failures[site] = problem
                continue
            return params, {
                "decrypt_s": seconds,
                "decrypt_site": site,
                "decrypt_round_trip_s": time.perf_counter() - t0,
                "decrypt_bytes_up": params_nbytes(params),
            }
        raise HEProtocolError(
            f"round {round_idx}: no site decrypted the aggregate: "
            + "; ".join(f"{s}: {why}" for s, why in failures.items())
        )


def _check_decrypted(params: Params, layout: Layout) -> str | None:
    want = {s.name: s.shape for s in layout.tensors}
    if set(params) != set(want):
        return f"decrypted tensors {sorted(params)[:3]}..., expected {sorted(want)[:3]}..."
    for name, shape in want.items():
        t = params[name]
        if tuple(t.shape) != shape or not t.is_floating_point():
            return f"decrypted {name!r} is {t.dtype} {tuple(t.shape)}, expected {shape}"
        if not bool(torch.isfinite(t).all()):
            return f"decrypted {name!r} holds non-finite values"
    return None


__all__ = [
    "DECRYPT_ACTION",
    "ENV_VAR",
    "NODE_CONFIG_KEY",
    "FlowerEncryptedAggregation",
    "HEContextError",
    "HEProtocolError",
    "KeyFiles",
    "UpdateScreened",
    "agreed_public_context",
    "decrypt_reply",
    "pack",
    "seal_update",
    "site_contexts",
    "site_secret_context",
    "unpack",
    "write_keys",
]
