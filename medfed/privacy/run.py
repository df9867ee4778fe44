"""Where privacy meets the round loop: the wrapped algorithm, and ε bookkeeping per round.

The engine calls three things and knows nothing else about DP: :func:`create_algorithm` (the
strategy, wrapped when ``privacy.dp`` is set), :meth:`RoundPrivacy.admit` before a round (sites
whose budget is spent stop taking part) and :meth:`RoundPrivacy.record` after it (ε per site into
``history.jsonl``). Both runtimes go through the same loop, so both get the same accounting.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from medfed.algorithms import STRATEGIES, Algorithm
from medfed.client.train import TrainOptions
from medfed.config import RunConfig
from medfed.privacy.accounting import Event, PrivacySpend
from medfed.privacy.config import DPMode
from medfed.privacy.dp import (
    CLIP_SCALAR,
    PrivateAlgorithm,
    Schedule,
    round_events,
    sample_rate,
    steps_per_round,
)
from medfed.types import Params, StrategyState, Update
from medfed.validation import validate_update


def create_algorithm(
    config: RunConfig,
    *,
    num_sites: int,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    fraction: float | None = None,
) -> Algorithm:
    """The run's algorithm: the named strategy (default: the config's), private when configured."""
    strategy = config.federation.strategy
    algo = STRATEGIES.create(name or strategy.name, strategy.options if name is None else options)
    dp = config.privacy.dp
    if dp is None:
        return algo
    schedule = Schedule(
        rounds=config.federation.rounds,
        fraction=config.federation.fraction if fraction is None else fraction,
        num_sites=num_sites,
    )
    return PrivateAlgorithm(algo, dp, schedule=schedule, seed=config.seed)


@dataclass(frozen=True)
class Admission:
    participants: list[str]
    refused: dict[str, str]  # site -> why it may not take part
    stop: str | None = None  # the run must end: why


class RoundPrivacy:
    """The server's privacy ledger for one run (ε per site), checkpointed in the run's meta."""

    def __init__(self, config: RunConfig, algorithm: Algorithm, sites: Sequence[str]) -> None:
        dp = config.privacy.dp
        assert dp is not None and isinstance(algorithm, PrivateAlgorithm)
        self.cfg = dp
        self.algorithm = algorithm
        self.sites = tuple(sites)
        self.spend = PrivacySpend(delta=dp.delta, kind=dp.accountant)
        self._last: dict[str, Event] = {}

    @classmethod
    def for_run(
        cls, config: RunConfig, algorithm: Algorithm, sites: Sequence[str]
    ) -> RoundPrivacy | None:
        return None if config.privacy.dp is None else cls(config, algorithm, sites)

    # --- checkpoint ---
    def to_meta(self) -> dict[str, Any]:
        return self.spend.to_json() | {"last": {s: list(e) for s, e in self._last.items()}}

    def restore(self, meta: Mapping[str, Any] | None) -> None:
        if not meta:
            return
        self.spend = PrivacySpend.from_json(meta)
        last = meta.get("last", {})
        self._last = {s: (float(z), float(q), int(n)) for s, (z, q, n) in last.items()}

    # --- before a round ---
    def _next_event(self, site: str) -> Event | None:
        if self.cfg.mode is not DPMode.DPSGD:
            return self.algorithm.client_level_event()
        return self._last.get(site)  # dpsgd: a site's rounds cost what its last one did

    def admit(self, participants: Sequence[str], *, min_clients: int) -> Admission:
        budget = self.cfg.budget
        if budget is None:
            return Admission(list(participants), {})
        refused: dict[str, str] = {}
        for site in participants:
            nxt = self._next_event(site)
            if nxt is None:
                continue
            after = self.spend.epsilon(site, extra=[nxt])
            if after > budget * (1 + 1e-9):
                spent = self.spend.epsilon(site)
                refused[site] = (
                    f"privacy budget spent: ε={spent:.3g} so far, another round would reach "
                    f"{after:.3g} > {budget:g} (δ={self.cfg.delta:g})"
                )
        admitted = [s for s in participants if s not in refused]
        stop = None
        if len(admitted) < min_clients:
            stop = (
                f"privacy budget exhausted: {len(admitted)} site(s) may still take part, "
                f"min_clients={min_clients}; "
                + "; ".join(f"{s}: {why}" for s, why in sorted(refused.items()))
            )
        return Admission(admitted, refused, stop)

    def planned_event(self, n_train: int, opts: TrainOptions) -> Event:
        """What one round costs a site of ``n_train`` images, as its own accountant plans it
        (:meth:`PrivateAlgorithm._begin`): a server that cannot read the update's metrics (SecAgg+)
        derives it from the mechanism's parameters and the site's training-set size."""
        if self.cfg.mode is DPMode.DPSGD:
            return (
                self.algorithm.site_noise(n_train, opts),
                sample_rate(n_train, opts),
                steps_per_round(n_train, opts),
            )
        return self.algorithm.client_level_event()

    # --- after a round ---
    def record(self, updates: Sequence[Update], state: StrategyState) -> dict[str, Any]:
        events = round_events(self.cfg, self.algorithm, sites=self.sites, updates=updates)
        return self.record_events(events, state)

    def record_events(self, events: Mapping[str, Event], state: StrategyState) -> dict[str, Any]:
        """Book this round's ``events`` (site -> what it spent); the ``privacy`` row of history."""
        for site, event in events.items():
            self.spend.record(site, event)
            self._last[site] = event
        eps = self.spend.epsilons(self.sites)
        return {
            "mode": str(self.cfg.mode),
            "delta": self.cfg.delta,
            "accountant": str(self.cfg.accountant),
            "epsilon": {s: _finite(e) for s, e in eps.items()},
            "max_epsilon": _finite(max(eps.values(), default=0.0)),
            "noise_multiplier": {s: e[0] for s, e in events.items()},
            "clip": float(state.scalars.get(CLIP_SCALAR, self.cfg.clip)),
        }


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else float(x)


# Server halves that are the plain example-weighted mean with no server state beyond the round
# count: exactly what summing ciphertexts with plaintext weights computes.
HE_STRATEGIES = frozenset({"fedavg", "fedprox", "fedbn"})


class RoundEncryption(Protocol):
    """What ``train_loop`` asks of ``privacy.he``: screen an upload, merge the round's uploads.

    :class:`EncryptedAggregation` plays every role in the simulator; over Flower the runtime
    brings its own (:class:`medfed.runtime.flower.he.FlowerEncryptedAggregation`), whose sites
    encrypt and decrypt.
    """

    def validate(
        self,
        update: Update,
        global_params: Params,
        *,
        expected_keys: Collection[str] | None,
        max_relative_norm: float,
    ) -> str | None: ...

    def aggregate(
        self, global_params: Params, updates: Sequence[Update], state: StrategyState
    ) -> tuple[Params, StrategyState, dict[str, Any]]: ...


class EncryptedAggregation:
    """``privacy.he``: each round's merge as sites encrypt -> aggregator sums -> a site decrypts.

    The simulator plays all three roles in one process, but the aggregation step is handed only
    the public context and ciphertext bytes (:func:`medfed.privacy.he.aggregate_encrypted` refuses
    a secret key). Keys come from the sites' setup step at the start of the run; they are not
    checkpointed, so a resumed run makes new ones (nothing encrypted outlives its round).
    Update screening (non-finite values, shapes) happens before encryption, as a site would do
    it; the aggregator cannot screen ciphertexts, so norm-based rejection is off under HE.
    """

    def __init__(self, config: RunConfig, algorithm: Algorithm) -> None:
        from medfed.privacy.he import setup_keys

        assert config.privacy.he is not None
        self.keys = setup_keys(config.privacy.he)
        self.expected = algorithm.uploaded_keys()

    @classmethod
    def for_run(
        cls, config: RunConfig, algorithm: Algorithm, *, runtime: Any = None
    ) -> RoundEncryption | None:
        if config.privacy.he is None or str(config.paradigm) != "federated":
            return None  # one party (centralized, local-only) has nobody to hide an update from
        remote: RoundEncryption | None = getattr(runtime, "encrypted_aggregation", None)
        if remote is not None:  # the sites hold the key; this process only the public context
            return remote
        return cls(config, algorithm)

    def validate(
        self,
        update: Update,
        global_params: Params,
        *,
        expected_keys: Collection[str] | None,
        max_relative_norm: float,
    ) -> str | None:
        """The plaintext screen: in the simulator it runs before encryption, as at a site."""
        return validate_update(
            update,
            global_params,
            expected_keys=expected_keys,
            max_relative_norm=max_relative_norm,
        )

    def aggregate(
        self, global_params: Params, updates: Sequence[Update], state: StrategyState
    ) -> tuple[Params, StrategyState, dict[str, Any]]:
        from medfed.privacy.he import he_fedavg

        new, stats = he_fedavg(global_params, updates, keys=self.keys, expected_keys=self.expected)
        record = {
            "bytes_up": stats.bytes_up + stats.clear_bytes_up,
            "plaintext_bytes": stats.plaintext_bytes,
            "aggregate_bytes": stats.aggregate_bytes,
            "expansion": stats.expansion,
            "encrypt_s": stats.encrypt_s,
            "aggregate_s": stats.aggregate_s,
            "decrypt_s": stats.decrypt_s,
        }
        return new, replace(state, round=state.round + 1), record
