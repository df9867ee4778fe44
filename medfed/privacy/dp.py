"""Differential privacy for a federation: client-level DP-FedAvg and sample-level DP-SGD.

Three modes, three threat models (the README's privacy section says the same to users):

``local`` (client-level, noise at each site; the FedDP setting)
    Each site clips its update's change to L2 norm C and adds N(0, (σC)²) to every coordinate
    *before upload*. The aggregator, the other sites and anyone who sees a later model learn only
    noised updates: each round is a Gaussian mechanism of sensitivity C on the site's whole data
    set, so a site's ε composes over the rounds it took part in (sample rate 1). Trusts nobody;
    costs the most accuracy, because the noise does not average down until many sites take part.

``central`` (client-level DP-FedAvg, McMahan et al. 2018; noise once at the aggregator)
    Sites send clipped updates; the aggregator averages them with equal weights and adds
    N(0, (σC/m)²) for m updates. Protects every site against everyone who sees the global model
    (other sites, the public), *not* against the aggregator, which must be trusted (or replaced by
    secure aggregation that adds the noise). With a fraction q of sites sampled per round, ε is
    the subsampled Gaussian's at rate q (accounted as Poisson sampling, the usual approximation of
    fixed-size sampling), the same for every site. Adaptive clipping (Andrew et al. 2021) moves C
    toward a quantile of the update norms from a noised count of unclipped updates.

``dpsgd`` (sample-level, Opacus DP-SGD inside local training)
    Each site trains with per-example clipping and noise (Opacus' PrivacyEngine, Poisson
    sampling), so each *patient image* is protected against everyone outside the site, the
    aggregator included. ε per site composes every local step of every round.

All modes are the same object, :class:`PrivateAlgorithm`, wrapped around any registered strategy,
so both runtimes (simulator and Flower) get DP without knowing it: the client half applies the
update transforms (:mod:`medfed.privacy.transforms`) at the site, the server half adds central
noise, and the engine records ε per site each round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from medfed.algorithms.base import (
    Algorithm,
    FederationContext,
    LocalResult,
    LocalTask,
    NotVectorizable,
    VectorStep,
)
from medfed.client.train import SampleDP, TrainOptions, TrainResult
from medfed.data.site import ArrayDataset
from medfed.privacy.accounting import Event, calibrate, epsilon
from medfed.privacy.config import AdaptiveClipping, DPConfig, DPMode
from medfed.privacy.transforms import (
    ClipL2,
    GaussianNoise,
    TransformContext,
    add_gaussian_noise,
    chain,
    delta_of,
    noise_generator,
)
from medfed.seeding import torch_generator
from medfed.types import Buffers, ClientState, ParamKind, Params, StrategyState, Update

# Server halves whose merge is an average (central noise on the mean is then the whole story).
MEAN_STRATEGIES = frozenset({"fedavg", "fedprox", "fedbn", "fedadam", "fedyogi", "fedadagrad"})
# Client halves that change gradients outside per-example clipping, or upload more than weights.
REFUSED = {
    "scaffold": "SCAFFOLD uploads control variates that the clip does not bound",
}


def check_strategy(cfg: DPConfig, name: str, options: Mapping[str, object]) -> None:
    """Refuse combinations whose privacy claim would be false (ValueError naming the reason)."""
    if name in REFUSED:
        raise ValueError(f"privacy.dp cannot protect strategy {name!r}: {REFUSED[name]}")
    if cfg.mode is DPMode.CENTRAL and name not in MEAN_STRATEGIES:
        raise ValueError(
            f"privacy.dp mode central adds noise to an average; strategy {name!r} is not one "
            f"(use one of {', '.join(sorted(MEAN_STRATEGIES))}, or mode local/dpsgd)"
        )
    if cfg.mode is DPMode.DPSGD and name == "fedprox" and float(str(options.get("mu", 0.01))) > 0:
        raise ValueError(
            "privacy.dp mode dpsgd clips per-example gradients; FedProx's proximal term would "
            "bypass the clip (use fedavg, or fedprox with mu: 0)"
        )


def make_private_model(model: nn.Module) -> nn.Module:
    """The network with DP-compatible layers (Opacus' ``ModuleValidator.fix``: BatchNorm ->
    GroupNorm), and no in-place activations (Opacus' per-example hooks forbid them).

    BatchNorm's running statistics are computed from patient images and would leave the site
    unclipped and un-noised, and its batch statistics mix examples, which DP-SGD cannot bound.
    """
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    for module in fixed.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError(f"model cannot be made DP-compatible: {errors[0]}")
    return fixed


def sample_rate(n: int, opts: TrainOptions) -> float:
    """Opacus' Poisson rate for a site of ``n`` images: 1 / (batches per epoch)."""
    return 1.0 / math.ceil(n / opts.batch_size)


def steps_per_round(n: int, opts: TrainOptions) -> int:
    """DP-SGD steps (Poisson draws) a site of ``n`` images takes in one round."""
    steps = max(1, math.ceil(opts.epochs * math.ceil(n / opts.batch_size)))
    return min(steps, opts.max_steps) if opts.max_steps is not None else steps


@dataclass(frozen=True)
class Schedule:
    """What the accountant needs to know about the run to calibrate σ before it starts."""

    rounds: int
    fraction: float  # share of sites sampled per round
    num_sites: int


def calibrated_noise(
    cfg: DPConfig, schedule: Schedule, *, n: int | None, opts: TrainOptions
) -> float:
    """σ: the configured one, or the one that spends ``target_epsilon`` over the whole run.

    dpsgd calibrates at each site from its own size ``n`` (a site knows n, the server need not).
    """
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    assert cfg.target_epsilon is not None
    if cfg.mode is DPMode.DPSGD:
        if n is None:
            raise ValueError("dpsgd calibration happens at the site, which knows its size")
        rate = sample_rate(n, opts)
        steps = schedule.rounds * steps_per_round(n, opts)
    elif cfg.mode is DPMode.CENTRAL:
        rate, steps = schedule.fraction, schedule.rounds
    else:  # local: every round a site takes part in is one full-data Gaussian mechanism
        rate, steps = 1.0, schedule.rounds
    return calibrate(
        target_epsilon=cfg.target_epsilon,
        delta=cfg.delta,
        sample_rate=rate,
        steps=steps,
        kind=cfg.accountant,
    )


DP_GROUP = "dp"  # payload group carrying this round's clip bound C to the sites
CLIP_SCALAR = "dp.clip"


class PrivateAlgorithm:
    """``inner`` with DP: clip (and noise) at the site, central noise at the server, ε metrics."""

    def __init__(self, inner: Algorithm, cfg: DPConfig, *, schedule: Schedule, seed: int) -> None:
        self.inner = inner
        self.cfg = cfg
        self.schedule = schedule
        self.seed = seed
        self.name = inner.name
        self.preserves_consensus = inner.preserves_consensus and cfg.mode is DPMode.DPSGD
        # Client-level modes calibrate once from the schedule; dpsgd per site, from its size.
        self.noise_multiplier = (
            None
            if cfg.mode is DPMode.DPSGD and cfg.noise_multiplier is None
            else calibrated_noise(cfg, schedule, n=None, opts=TrainOptions())
        )
        self._site_noise: dict[int, float] = {}
        if cfg.adaptive_clipping is not None:
            self.update_noise_multiplier()  # an impossible count noise fails here, not mid-run

    # --- server half ---
    def init(self, global_params: Params, *, context: FederationContext) -> StrategyState:
        state = self.inner.init(global_params, context=context)
        return replace(state, scalars=dict(state.scalars) | {CLIP_SCALAR: self.cfg.clip})

    def uploaded_keys(self) -> frozenset[str] | None:
        return self.inner.uploaded_keys()

    def _split(self, state: StrategyState) -> tuple[StrategyState, float]:
        scalars = dict(state.scalars)
        clip = float(scalars.pop(CLIP_SCALAR, self.cfg.clip))
        return replace(state, scalars=scalars), clip

    def payload(self, state: StrategyState) -> Buffers:
        inner_state, clip = self._split(state)
        clip_t = torch.tensor([clip], dtype=torch.float64)
        return dict(self.inner.payload(inner_state)) | {DP_GROUP: {"clip": clip_t}}

    def aggregate(
        self,
        global_params: Params,
        updates: Sequence[Update],
        state: StrategyState,
        *,
        round_idx: int,
    ) -> tuple[Params, StrategyState]:
        inner_state, clip = self._split(state)
        new_clip = clip
        if self.cfg.mode is DPMode.CENTRAL and updates:
            gen = noise_generator(
                torch_generator(self.seed, "dp-central", round_idx), secure=self.cfg.secure_rng
            )
            unclipped = [float(u.metrics.get("dp_unclipped", 1.0)) for u in updates]
            updates = [self._central_mean(global_params, updates, clip, gen)]
            if self.cfg.adaptive_clipping is not None:
                new_clip = adapt_clip(
                    clip,
                    unclipped,
                    self.cfg.adaptive_clipping,
                    count_stddev=self._count_stddev(),
                    generator=gen,
                )
        new, out_state = self.inner.aggregate(
            global_params, updates, inner_state, round_idx=round_idx
        )
        return new, replace(out_state, scalars=dict(out_state.scalars) | {CLIP_SCALAR: new_clip})

    def _count_stddev(self) -> float:
        ad = self.cfg.adaptive_clipping
        assert ad is not None
        if ad.count_stddev is not None:
            return ad.count_stddev
        # The paper's m/20 assumes hundreds of sites; in a small federation it would leave the
        # count nearly noiseless and force σ_Δ up without bound, so it is at least σ.
        assert self.noise_multiplier is not None
        expected = max(1.0, self.schedule.fraction * self.schedule.num_sites)
        return max(expected / 20.0, self.noise_multiplier)

    def update_noise_multiplier(self) -> float:
        """σ_Δ on the updates. With adaptive clipping the count's noise σ_b spends privacy too;
        Andrew et al. (Thm. 1): the pair is as private as one Gaussian of multiplier
        (σ_Δ⁻² + (2σ_b)⁻²)^-1/2, so σ_Δ is raised until that equals the accounted σ."""
        assert self.noise_multiplier is not None
        if self.cfg.adaptive_clipping is None:
            return self.noise_multiplier
        z, sb = self.noise_multiplier, self._count_stddev()
        if 2 * sb <= z:
            raise ValueError(
                f"adaptive clipping: count noise std {sb:g} is too small for noise multiplier "
                f"{z:g} (need 2·count_stddev > σ); raise adaptive_clipping.count_stddev"
            )
        return float((z**-2 - (2 * sb) ** -2) ** -0.5)

    def _central_mean(
        self, global_params: Params, updates: Sequence[Update], clip: float, gen: torch.Generator
    ) -> Update:
        """Equal-weight mean of the clipped changes plus N(0, (σC/m)²): one virtual update.

        Equal weights bound one site's influence on the mean by C/m; example weights would let a
        large site's influence exceed it. The inner strategy then merges the single noised mean
        (FedAvg: takes it; FedOpt: uses it as the pseudo-gradient), which is post-processing.
        """
        assert self.noise_multiplier is not None
        m = len(updates)
        deltas = [delta_of(u, global_params) for u in updates]
        keys = sorted(deltas[0])
        mean = {k: torch.stack([d[k] for d in deltas]).sum(0) / m for k in keys}
        noisy = add_gaussian_noise(mean, self.update_noise_multiplier() * clip / m, gen)
        params = dict(updates[0].params)
        for k in keys:
            params[k] = (global_params[k].to(noisy[k].device) + noisy[k]).to(params[k].dtype)
        return Update(
            site="<dp-mean>",
            params=params,
            kind=ParamKind.WEIGHTS,
            num_examples=sum(u.num_examples for u in updates),
            metrics={},
        )

    # --- client half ---
    def local_update(
        self,
        model: nn.Module,
        task: LocalTask,
        data: ArrayDataset,
        opts: TrainOptions,
        *,
        generator: torch.Generator,
        device: torch.device,
    ) -> LocalResult:
        site_round = self._begin(task, len(data), opts)
        result = self.inner.local_update(
            model, site_round.task, data, opts, generator=generator, device=device
        )
        return self._end(site_round, result, generator)

    def _begin(self, task: LocalTask, n: int, opts: TrainOptions) -> _SiteRound:
        """Before training, at the site: the clip bound, the budget check, the inner task."""
        payload = dict(task.payload)
        dp_group = payload.pop(DP_GROUP, {})
        clip = float(dp_group["clip"].item()) if "clip" in dp_group else self.cfg.clip
        client_state = dict(task.client_state)
        spent = _history(client_state.pop(DP_GROUP, {}))
        if self.cfg.mode is DPMode.DPSGD:
            sigma = self.site_noise(n, opts)
            sample_dp = SampleDP(
                noise_multiplier=sigma, max_grad_norm=clip, secure_rng=self.cfg.secure_rng
            )
            planned: Event = (sigma, sample_rate(n, opts), steps_per_round(n, opts))
        else:
            sample_dp = None
            planned = self.client_level_event()
        self._check_budget(task.site, spent, planned)
        inner_task = replace(task, payload=payload, client_state=client_state, sample_dp=sample_dp)
        return _SiteRound(task, inner_task, clip, spent, planned)

    def _end(
        self, site_round: _SiteRound, result: LocalResult, generator: torch.Generator
    ) -> LocalResult:
        """After training, at the site: clip (and noise) the update from the site's generator."""
        update = result.update
        ctx = TransformContext(
            global_params=site_round.received.global_params,
            generator=noise_generator(generator, secure=self.cfg.secure_rng),
        )
        metrics = dict(update.metrics)
        clip = site_round.clip
        if self.cfg.mode is DPMode.LOCAL:
            assert self.noise_multiplier is not None
            update = chain(ClipL2(clip), GaussianNoise(self.noise_multiplier * clip))(update, ctx)
            # The raw norm and the clipped bit are functions of the data: they stay here.
            update = replace(update, metrics=metrics)
        elif self.cfg.mode is DPMode.CENTRAL:
            update = ClipL2(clip)(update, ctx)  # the trusted aggregator adds the noise
        # dpsgd: Poisson draws are fixed in advance, so the planned event is what was spent (an
        # empty draw still counts).
        event = site_round.planned
        kept = dict(result.client_state)
        if self.cfg.mode is not DPMode.CENTRAL:
            update = replace(
                update, metrics=dict(update.metrics) | dict(zip(EVENT_KEYS, event, strict=True))
            )
            # The site's own accountant: it refuses to overspend even if a server asks it to.
            kept[DP_GROUP] = {"history": _history_tensor([*site_round.spent, event])}
        return LocalResult(update, kept)

    def vector_step(self, opts: TrainOptions) -> VectorStep:
        """The inner client half, vectorised, with the same clip and noise per site afterwards
        (each from that site's own generator, drawn after training as sequentially)."""
        if self.cfg.mode is DPMode.DPSGD:
            raise NotVectorizable("privacy.dp mode dpsgd clips per-example gradients (Opacus)")
        vector_step = getattr(self.inner, "vector_step", None)
        if vector_step is None:
            raise NotVectorizable(f"strategy {self.inner.name!r} has no vectorised client half")
        inner: VectorStep = vector_step(opts)

        def admit(task: LocalTask, data: ArrayDataset) -> LocalTask:
            return inner.admit(self._begin(task, len(data), opts).task, data)

        def finish(
            task: LocalTask,
            trained: LocalTask,
            params: Params,
            result: TrainResult,
            generator: torch.Generator,
        ) -> LocalResult:
            # _begin is pure given the task (its budget check already passed in admit).
            site_round = self._begin(task, 0, opts)
            inner_result = inner.finish(site_round.task, trained, params, result, generator)
            return self._end(site_round, inner_result, generator)

        return replace(inner, admit=admit, finish=finish)

    def client_level_event(self) -> Event:
        """One round of client-level DP as the accountant sees it: a full-data Gaussian step
        (local), or one step of the subsampled Gaussian at the sampled share of sites (central)."""
        assert self.noise_multiplier is not None
        rate = self.schedule.fraction if self.cfg.mode is DPMode.CENTRAL else 1.0
        return (self.noise_multiplier, rate, 1)

    def site_noise(self, n: int, opts: TrainOptions) -> float:
        """dpsgd's σ for a site of ``n`` images (calibrated once per size when targeting ε)."""
        if self.cfg.noise_multiplier is not None:
            return self.cfg.noise_multiplier
        if n not in self._site_noise:
            self._site_noise[n] = calibrated_noise(self.cfg, self.schedule, n=n, opts=opts)
        return self._site_noise[n]

    def _check_budget(self, site: str, spent: list[Event], planned: Event) -> None:
        budget = self.cfg.budget
        if budget is None or self.cfg.mode is DPMode.CENTRAL:
            return
        after = epsilon([*spent, planned], delta=self.cfg.delta, kind=self.cfg.accountant)
        if after > budget * (1 + 1e-9):
            raise BudgetExhausted(
                f"site {site!r}: privacy budget exhausted: another round would spend "
                f"ε={after:.3g} > {budget:g} at δ={self.cfg.delta:g}; it stops taking part"
            )

    def personalize(self, global_params: Params, client_state: ClientState) -> Params:
        state = {k: v for k, v in client_state.items() if k != DP_GROUP}
        return self.inner.personalize(global_params, state)

    def __repr__(self) -> str:
        return f"PrivateAlgorithm({self.inner!r}, {self.cfg!r})"


@dataclass(frozen=True)
class _SiteRound:
    """One site's DP bookkeeping for one round, between :meth:`PrivateAlgorithm._begin` and
    :meth:`PrivateAlgorithm._end`."""

    received: LocalTask
    task: LocalTask  # what the inner client half trains on (DP group stripped)
    clip: float
    spent: list[Event]
    planned: Event


class BudgetExhausted(RuntimeError):
    """A site's accountant refuses another round."""


def _history(group: Mapping[str, torch.Tensor]) -> list[Event]:
    t = group.get("history")
    if t is None or t.numel() == 0:
        return []
    return [(float(z), float(q), int(n)) for z, q, n in t.double().cpu().tolist()]


def _history_tensor(events: Sequence[Event]) -> torch.Tensor:
    return torch.tensor([list(e) for e in events], dtype=torch.float64).reshape(-1, 3)


def adapt_clip(
    clip: float,
    unclipped: Sequence[float],
    cfg: AdaptiveClipping,
    *,
    count_stddev: float,
    generator: torch.Generator,
) -> float:
    """C <- C·exp(-η(b̄ - γ)), b̄ the noised share of updates that were not clipped.

    Geometric steps make C move by the same factor whether it starts too small or too large, and
    converge to the γ-quantile of the update norms (Andrew et al. 2021, Alg. 1).
    """
    m = len(unclipped)
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_stddev
    share = (sum(unclipped) + noise) / m
    return float(clip * math.exp(-cfg.lr * (share - cfg.target_quantile)))


def round_events(
    cfg: DPConfig,
    algorithm: PrivateAlgorithm,
    *,
    sites: Sequence[str],
    updates: Sequence[Update],
) -> dict[str, Event]:
    """What each site spent this round, as the server accounts it.

    central: every site of the federation spends one subsampled step (whether sampled or not);
    local/dpsgd: each contributing site spends what its own accountant recorded.
    """
    if cfg.mode is DPMode.CENTRAL:
        return dict.fromkeys(sites, algorithm.client_level_event())
    return {u.site: event_of(u) for u in updates if EVENT_KEYS[0] in u.metrics}


EVENT_KEYS = ("dp_noise_multiplier", "dp_sample_rate", "dp_steps")


def event_of(update: Update) -> Event:
    """The accountant event a site reports with its update (mechanism parameters, not data)."""
    z, q, steps = (float(update.metrics[k]) for k in EVENT_KEYS)
    return (z, q, int(steps))
