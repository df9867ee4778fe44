"""Privacy settings of a run: validated data, read before anything trains.

``privacy.dp`` chooses a DP mode and its parameters (see :mod:`medfed.privacy.dp` for each
mode's threat model); ``privacy.he`` turns on CKKS-encrypted aggregation.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfed.privacy.accounting import AccountantKind
from medfed.types import StrEnum


class DPMode(StrEnum):
    LOCAL = "local"
    CENTRAL = "central"
    DPSGD = "dpsgd"


class AdaptiveClipping(BaseModel):
    """Andrew et al. 2021: geometric update of C toward the ``target_quantile`` of update norms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_quantile: float = Field(0.5, gt=0, lt=1)
    lr: float = Field(0.2, gt=0, description="η in C <- C·exp(-η(b̄ - γ))")
    count_stddev: float | None = Field(
        None,
        gt=0,
        description="std of the noise on the count of unclipped updates; default max(m/20, σ) "
        "for m expected updates per round (m/20 as in the paper)",
    )


class DPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: DPMode = DPMode.LOCAL
    clip: float = Field(1.0, gt=0, description="L2 bound C on an update (per example for dpsgd)")
    noise_multiplier: float | None = Field(
        None, gt=0, description="σ: noise std is σ·C; give this or target_epsilon"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate σ before training so the whole run spends this ε"
    )
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: AccountantKind = AccountantKind.RDP
    max_epsilon: float | None = Field(
        None,
        gt=0,
        description="a site whose next round would take it past this ε stops taking part; "
        "default: target_epsilon",
    )
    adaptive_clipping: AdaptiveClipping | None = Field(
        None, description="central mode only: adapt C to a quantile of update norms"
    )
    secure_rng: bool = Field(
        False,
        description="draw noise from the OS's CSPRNG (deployments); default is seeded noise, "
        "reproducible run to run (research)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.adaptive_clipping is not None and self.mode is not DPMode.CENTRAL:
            raise ValueError(
                "adaptive_clipping needs mode: central (it learns C from a noised count of "
                "unclipped updates at the aggregator)"
            )
        return self

    @property
    def budget(self) -> float | None:
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dp: DPConfig | None = Field(None, description="differential privacy; absent = off")
