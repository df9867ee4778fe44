"""SecAgg+ planning: the options, the checks run before a site is contacted, and the bounds.

See :mod:`medfed.runtime.flower.secagg` for the overview and the limits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, field_validator
from pydantic import Field as PydField

from medfed.client.train import TrainOptions
from medfed.config import FaultKind, RunConfig
from medfed.engine import FederationError
from medfed.privacy.config import DPMode
from medfed.privacy.dp import Schedule, calibrated_noise, sample_rate, steps_per_round
from medfed.types import Paradigm, Params

SECURE_AGGREGATION = "secagg+"
MODULUS_RANGE = 2**32  # Flower's default mask modulus; every masked sum is taken mod this
SECURE_STRATEGIES = frozenset({"fedavg", "fedprox"})
"""Strategies whose server half is the plain example-weighted mean of full weights."""

_ROBUST = (
    "a robust rule looks at every site's update on its own (coordinate-wise median / trimmed "
    "mean, Krum's distances), and SecAgg+ exists to hide exactly those: the server only ever "
    "sees the weighted sum"
)
_FEDOPT = (
    "its server half takes an optimizer step with moment state, not the plain example-weighted "
    "mean of full weights that is all the SecAgg+ path computes"
)
REFUSED_STRATEGIES: Mapping[str, str] = {
    "median": _ROBUST,
    "trimmed_mean": _ROBUST,
    "krum": _ROBUST,
    "fedadam": _FEDOPT,
    "fedyogi": _FEDOPT,
    "fedadagrad": _FEDOPT,
    "fedbn": "its sites keep their own BatchNorm layers and upload only the rest; the SecAgg+ "
    "path averages the full state dict and keeps no site-held state",
    "scaffold": "it uploads control-variate corrections alongside the weights and keeps server "
    "control variates; the SecAgg+ path averages only the weights",
}
UNDETECTABLE_FAULTS = frozenset({FaultKind.NAN, FaultKind.WRONG_SHAPE, FaultKind.SCALE})


class SecAggError(RuntimeError):
    """A site cannot take part in this secure round (raised at the site: it drops out)."""


class SecAggOptions(BaseModel):
    """Flower's SecAgg+ parameters (``SecAggPlusWorkflow``), validated against the federation.

    ``num_shares`` and ``reconstruction_threshold`` are counts, or fractions in (0, 1] of the
    sites sampled per round (resp. of ``num_shares``), resolved as Flower resolves them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_shares: StrictInt | float = PydField(
        3,
        description="size of each site's neighbourhood (itself included) holding shares of its "
        "secrets; > 2, odd, <= sites sampled per round; or a fraction of those sites",
    )
    reconstruction_threshold: StrictInt | float = PydField(
        2,
        description="shares needed to rebuild a secret: >= 2 and < num_shares; dropout "
        "tolerance per neighbourhood = num_shares - threshold; or a fraction of num_shares",
    )
    max_weight: float | None = PydField(
        None,
        gt=0,
        description="largest num_examples a site may report per round; default: derived from "
        "the sites' training-set sizes and train.epochs / train.max_steps",
    )
    clipping_range: float = PydField(
        8.0,
        gt=0,
        description="uploads are clipped to ±this before quantisation; with privacy.dp mode "
        "local it must hold the weights plus the sites' noise (checked at start)",
    )
    quantization_range: int = PydField(
        2**22, ge=2, description="integer levels over [-clipping_range, clipping_range]"
    )
    timeout: float = PydField(
        600.0, gt=0, description="seconds to wait for sites to connect and per exchange"
    )
    allow_clipping: bool = PydField(
        False, description="go on (with a warning) when a site reports clipped values"
    )

    @field_validator("num_shares")
    @classmethod
    def _shares(cls, v: int | float) -> int | float:
        if isinstance(v, int) and v <= 2:
            raise ValueError(f"num_shares must be > 2 (or a fraction in (0, 1]), got {v}")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"num_shares as a fraction must be in (0, 1], got {v}")
        return v

    @field_validator("reconstruction_threshold")
    @classmethod
    def _threshold(cls, v: int | float) -> int | float:
        if isinstance(v, int) and v < 2:
            raise ValueError(
                f"reconstruction_threshold must be >= 2, got {v}: with 1, any single neighbour "
                "could rebuild a site's masks"
            )
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"reconstruction_threshold as a fraction must be in (0, 1], got {v}")
        return v


@dataclass(frozen=True)
class SecAggPlan:
    """The options resolved for a federation: what the workflow gets, and what it tolerates."""

    options: SecAggOptions
    num_sites: int
    sampled: int  # sites sampled per round
    num_shares: int
    threshold: int

    @property
    def dropout_tolerance(self) -> int:
        """Dropouts a neighbourhood survives: more, and the round cannot be unmasked."""
        return self.num_shares - self.threshold

    def describe(self) -> dict[str, Any]:
        return {
            **self.options.model_dump(),
            "num_shares": self.num_shares,
            "reconstruction_threshold": self.threshold,
            "sampled_per_round": self.sampled,
            "dropout_tolerance": self.dropout_tolerance,
            "modulus_range": MODULUS_RANGE,
        }


def sampled_per_round(config: RunConfig, num_sites: int) -> int:
    """How many sites medfed's star topology samples each round (``StarTopology.plan``)."""
    fed = config.federation
    return min(num_sites, max(fed.min_clients, math.ceil(fed.fraction * num_sites)))


def _resolve_shares(options: SecAggOptions, sampled: int) -> tuple[int, int]:
    """(num_shares, threshold) as ``SecAggPlusWorkflow.setup_stage`` resolves fractions."""
    if isinstance(options.num_shares, float):
        shares = round(options.num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    else:
        shares = options.num_shares
    if isinstance(options.reconstruction_threshold, float):
        threshold = max(round(options.reconstruction_threshold * shares), 2)
    else:
        threshold = options.reconstruction_threshold
    return shares, threshold


def check_secagg(
    config: RunConfig, num_sites: int, options: SecAggOptions | None = None
) -> SecAggPlan:
    """Everything SecAgg+ needs that can be checked before a site is contacted; a
    ``FederationError`` saying what to change otherwise."""
    options = options or SecAggOptions()
    if config.paradigm is not Paradigm.FEDERATED:
        raise FederationError(
            f"secure aggregation is for federated training, not {config.paradigm}"
        )
    name = config.federation.strategy.name
    if name not in SECURE_STRATEGIES:
        why = REFUSED_STRATEGIES.get(
            name, "its server half is not the plain example-weighted mean of full weights"
        )
        raise FederationError(
            f"strategy {name!r} cannot run under SecAgg+: {why}. Secure aggregation supports "
            f"{', '.join(sorted(SECURE_STRATEGIES))}"
        )
    if config.privacy.he is not None:
        raise FederationError(
            "privacy.he cannot run under SecAgg+: both hide each site's update from the server, "
            "by different protocols, and SecAgg+ masks plaintext integers, not CKKS ciphertexts. "
            "Drop --secagg (HE over Flower: sites encrypt, the server sums ciphertexts) or drop "
            "privacy.he"
        )
    dp = config.privacy.dp
    if dp is not None and dp.mode is DPMode.CENTRAL:
        raise FederationError(
            "privacy.dp mode central cannot run under SecAgg+: central noise is added by an "
            "aggregator that sees the mean, and under SecAgg+ nobody does (it would have to be "
            "distributed noise, shared out among the sites: not implemented). Use mode local or "
            "dpsgd (the site adds the noise before masking), or central DP without --secagg"
        )
    for fault in config.faults:
        if fault.kind in UNDETECTABLE_FAULTS:
            raise FederationError(
                f"fault {fault.kind!r} at site {fault.site!r}: under SecAgg+ the server never "
                "sees a single update, so a poisoned one can be neither detected nor rejected "
                "(medfed's update validation does not run); only 'raise' and 'drop' faults "
                "(dropouts) are meaningful here"
            )
    if num_sites < 3:
        raise FederationError(
            f"SecAgg+ needs at least 3 sites, got {num_sites}: with two, each site could "
            "subtract its own update from the mean and read the other's"
        )
    if config.federation.min_clients > num_sites:
        raise FederationError(
            f"min_clients={config.federation.min_clients} but the federation has {num_sites} sites"
        )
    sampled = sampled_per_round(config, num_sites)
    if sampled < 3:
        raise FederationError(
            f"SecAgg+ needs at least 3 sites per round, but fraction="
            f"{config.federation.fraction:g} and min_clients={config.federation.min_clients} "
            f"sample {sampled} of {num_sites}; raise federation.fraction or min_clients"
        )
    shares, threshold = _resolve_shares(options, sampled)
    if shares > sampled:
        raise FederationError(
            f"num_shares={shares} exceeds the {sampled} sites sampled per round: a site shares "
            f"its secrets with num_shares - 1 neighbours; use num_shares <= {sampled}"
        )
    if shares % 2 == 0 and shares != sampled:
        raise FederationError(
            f"num_shares={shares} must be odd (a site and num_shares // 2 neighbours on each "
            f"side) unless it equals the {sampled} sites sampled per round"
        )
    if threshold >= shares:
        raise FederationError(
            f"reconstruction_threshold={threshold} must be less than num_shares={shares}: a "
            "neighbourhood tolerates num_shares - threshold dropouts, and Flower requires at "
            "least one"
        )
    if threshold < 2:
        raise FederationError(f"reconstruction_threshold resolves to {threshold}; it must be >= 2")
    if sampled * options.quantization_range >= MODULUS_RANGE:
        raise FederationError(
            f"{sampled} sites x quantization_range={options.quantization_range} would overflow "
            f"the {MODULUS_RANGE}-value mask modulus; lower quantization_range"
        )
    return SecAggPlan(options, num_sites, sampled, shares, threshold)


POISSON_OVERFLOW = 1e-9
"""Chance per site and round that DP-SGD's Poisson batches exceed the max_weight derived for it."""


def max_examples(n_train: int, opts: TrainOptions, *, poisson: bool = False) -> int:
    """The most ``num_examples`` a site with ``n_train`` images reports in one local round.

    With ``poisson`` (DP-SGD), each of the round's steps draws every example with probability
    q = 1 / batches-per-epoch, so the count is Binomial(steps * n, q): its mean is about one pass
    per epoch but it has no useful hard bound below ``steps * n``. The bound is the count that is
    exceeded with probability below :data:`POISSON_OVERFLOW` (a site above it drops out of the
    round rather than overflow its weight).
    """
    if poisson:
        from scipy.stats import binom

        trials = steps_per_round(n_train, opts) * n_train
        quantile = binom.isf(POISSON_OVERFLOW, trials, sample_rate(n_train, opts))
        return max(int(min(quantile, trials)), 1)
    bound = math.ceil(opts.epochs) * n_train
    if opts.max_steps is not None:
        bound = min(bound, opts.max_steps * opts.batch_size)
    return max(bound, 1)


NOISE_OVERFLOW = 1e-6
"""Chance per site and round that honest local-DP noise trips the SecAgg+ clipping flag, at the
clipping_range :func:`dp_clipping_range` asks for."""


def dp_clipping_range(config: RunConfig, initial: Params) -> float | None:
    """The clipping_range honest ``privacy.dp`` mode ``local`` uploads need, or None (no local DP).

    A site uploads its weights plus N(0, (σC)²) per coordinate, masked after the noise, so
    SecAgg+'s ±clipping_range must hold the weights *and* the noise tail. Over d coordinates the
    largest |noise| exceeds ``t`` with probability at most ``d * erfc(t / (σC √2))`` (union
    bound); ``t`` is chosen so that is :data:`NOISE_OVERFLOW`, and added to the largest |weight|
    of the initial model (training moves weights too: keep a margin).
    """
    dp = config.privacy.dp
    if dp is None or dp.mode is not DPMode.LOCAL:
        return None
    schedule = Schedule(config.federation.rounds, config.federation.fraction, num_sites=1)
    std = calibrated_noise(dp, schedule, n=None, opts=config.train) * dp.clip
    floats = [v for v in initial.values() if v.is_floating_point() and v.numel()]
    d = sum(v.numel() for v in floats)
    peak = max((float(v.detach().abs().max()) for v in floats), default=0.0)
    z = NormalDist().inv_cdf(1.0 - NOISE_OVERFLOW / (2.0 * max(d, 1)))
    return peak + z * std


def check_dp_clipping(config: RunConfig, options: SecAggOptions, initial: Params) -> None:
    """Refuse a clipping_range that honest local-DP noise would overflow (FederationError)."""
    needed = dp_clipping_range(config, initial)
    if needed is None or options.clipping_range >= needed:
        return
    dp = config.privacy.dp
    assert dp is not None
    raise FederationError(
        f"clipping_range={options.clipping_range:g} is too small for privacy.dp mode local: "
        f"each site adds noise of std σC per coordinate (clip={dp.clip:g}) before masking, and "
        f"its largest value over the model exceeds the range in more than "
        f"{NOISE_OVERFLOW:g} of rounds, which stops the run (clipping flag). Raise "
        f"clipping_range to at least {math.ceil(needed):d} (the quantisation error grows only "
        "linearly with it)"
    )


def round_shares_problem(plan: SecAggPlan, admitted: int) -> str | None:
    """Why ``admitted`` sites (fewer than sampled: budgets spent) cannot form a secure round."""
    if admitted < 3:
        return (
            f"SecAgg+ needs at least 3 sites per round, {admitted} remain: with two, each could "
            "read the other's update from the mean"
        )
    shares, _ = _resolve_shares(plan.options, admitted)
    if shares > admitted or (shares % 2 == 0 and shares != admitted):
        return f"num_shares={shares} does not fit the {admitted} sites that remain"
    return None


def max_steps(n_train: int, opts: TrainOptions) -> int:
    """The most optimizer steps a site with ``n_train`` images takes in one local round."""
    bound = math.ceil(opts.epochs) * math.ceil(n_train / opts.batch_size)
    if opts.max_steps is not None:
        bound = min(bound, opts.max_steps)
    return max(bound, 1)


def error_bound(options: SecAggOptions, *, max_weight: float, examples: Sequence[int]) -> float:
    """Largest per-coordinate error of one securely aggregated mean, before float32 rounding.

    With ``w_i = n_i / max_weight``, quantum ``q = 2C / Q``: every site's stochastic rounding of
    ``w_i * x_i`` is off by < q, and its quantised weight by <= 1 / (2Q), which moves the mean by
    at most ``2C / (2Q)`` per site; summed over k sites and divided by ``sum_i w_i``:
    ``(k * 2C/Q + k * C/Q) / sum_i w_i = 3kC / (Q sum_i w_i)``.
    """
    total = sum(examples) / max_weight
    if total <= 0:
        return float("inf")
    c, q = options.clipping_range, options.quantization_range
    return 3.0 * len(examples) * c / (q * total)
