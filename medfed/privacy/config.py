"""Privacy settings of a run: validated data, read before anything trains.

``privacy.dp`` chooses a DP mode and its parameters (see :mod:`medfed.privacy.dp` for each
mode's threat model); ``privacy.he`` turns on CKKS-encrypted aggregation.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


# Largest total coefficient-modulus bit count per polynomial degree at 128-bit security (the
# HomomorphicEncryption.org standard, as SEAL's CoeffModulus::MaxBitCount): beyond it SEAL refuses
# the parameters, so they are rejected here first with a message that says why.
MAX_COEFF_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


class HEOptions(BaseModel):
    """CKKS parameters for the sites' one-time key setup.

    The defaults are TenSEAL's tutorial parameters for one multiplicative level: N = 8192
    (4,096 values per ciphertext, 128-bit security), primes 60 | 40 40 | 60 and scale 2^40. The
    aggregation multiplies each ciphertext once by a plaintext weight, so one level is all it
    needs; more intermediate primes only make ciphertexts larger.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    poly_modulus_degree: int = Field(8192, ge=4096, le=32768)
    coeff_mod_bit_sizes: list[int] = Field(default_factory=lambda: [60, 40, 40, 60], min_length=3)
    global_scale_bits: int = Field(40, ge=20, le=59)

    @field_validator("poly_modulus_degree")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"poly_modulus_degree must be a power of two, got {value}")
        return value

    @field_validator("coeff_mod_bit_sizes")
    @classmethod
    def _prime_sizes(cls, value: list[int]) -> list[int]:
        bad = [b for b in value if not 20 <= b <= 60]
        if bad:
            raise ValueError(f"each coefficient prime must have 20..60 bits (SEAL's range): {bad}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> HEOptions:
        sizes, scale = self.coeff_mod_bit_sizes, self.global_scale_bits
        # The primes a rescale divides by must match the scale, or the scale drifts level by level.
        middle = sizes[1:-1]
        if any(b != scale for b in middle):
            raise ValueError(
                f"intermediate primes {middle} must all have global_scale_bits={scale} bits"
            )
        # After the one rescale the first prime alone must hold value * 2^scale with room to spare.
        if sizes[0] <= scale:
            raise ValueError(
                f"the first prime ({sizes[0]} bits) must be larger than the scale ({scale} bits)"
            )
        limit = MAX_COEFF_BITS_128[self.poly_modulus_degree]
        if sum(sizes) > limit:
            raise ValueError(
                f"coefficient primes total {sum(sizes)} bits; N={self.poly_modulus_degree} allows "
                f"at most {limit} bits for 128-bit security"
            )
        return self


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dp: DPConfig | None = Field(None, description="differential privacy; absent = off")
    he: HEOptions | None = Field(
        None,
        description="CKKS-encrypted FedAvg (TenSEAL): the aggregator sums ciphertexts it cannot "
        "read; absent = off",
    )

    @model_validator(mode="after")
    def _compatible(self) -> PrivacyConfig:
        if self.he is not None and self.dp is not None and self.dp.mode is DPMode.CENTRAL:
            raise ValueError(
                "privacy.he with privacy.dp mode central: the aggregator adds central noise to a "
                "mean it must see, and under HE it sees none; use dp mode local or dpsgd with he"
            )
        return self
