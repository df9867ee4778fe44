"""What a study is: the networks, the paradigms, one training budget, and the statistics.

A study config is validated data like a run config, and every (network, paradigm) pair becomes an
ordinary :class:`~medfed.config.RunConfig`, so the study trains through the same engine, with the
same checkpoints and resume, as ``medfed run``.

Equal budgets (FLamby's protocol): ``budget.pooled_epochs`` = E is how many passes over the pooled
training data each paradigm gets. With R rounds, every round trains E/R local epochs (E/(R·fraction)
for a federation that samples a fraction of its sites), so centralized, federated and the sum of
the local-only models all see E × N training images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from medfed.client.train import TrainOptions
from medfed.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    FederationConfig,
    ModelConfig,
    RunConfig,
    ValidationConfig,
    _Section,
    check_model_task,
    check_privacy,
    read_yaml,
    validate_tree,
)
from medfed.data.synthetic.histology import HistologyCohort
from medfed.privacy.config import PrivacyConfig
from medfed.topologies.config import OneShotConfig, PeerConfig
from medfed.types import Paradigm, Task

# Top-level keys of results.json besides the networks; a network may not be called like these.
RESERVED_KEYS = frozenset(
    {"comparisons", "timing", "config_hash", "meta", "privacy", "peer", "one_shot"}
)
# Without a server loop: no DP accountant or encrypted sum, and (so far) classifiers only.
DECENTRAL_PARADIGMS = (Paradigm.CYCLIC, Paradigm.GOSSIP, Paradigm.ONE_SHOT)
# Paradigms the study runner can train, score and compare (a new one is refused until it can).
STUDY_PARADIGMS = (Paradigm.CENTRALIZED, Paradigm.FEDERATED, Paradigm.LOCAL, *DECENTRAL_PARADIGMS)
# Options the study derives from its budget; setting them by hand would break equal budgets.
DERIVED_TRAIN_OPTIONS = frozenset({"epochs", "max_steps"})


class NetworkSpec(_Section):
    label: str = Field(description="display name, e.g. ResNet50; the key in results.json")
    model: ModelConfig
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="per-network changes to the study's shared train options, e.g. {lr: 0.01}",
    )
    privacy: PrivacyConfig | None = Field(
        None,
        description="replaces the study's privacy for this network, so one study can train the "
        "same model with and without DP (privacy: {} turns a study-wide DP off here)",
    )

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("label must not be empty")
        if v in RESERVED_KEYS:
            raise ValueError(f"label {v!r} is reserved in results.json; choose another")
        return v

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_train_changes(v, derived_from="budget.pooled_epochs")

    @property
    def slug(self) -> str:
        """Folder name: the label lower-cased, runs of other characters turned into '-'."""
        return slugify(self.label) or "network"


def _check_train_changes(v: dict[str, Any], *, derived_from: str) -> dict[str, Any]:
    derived = sorted(DERIVED_TRAIN_OPTIONS & set(v))
    if derived:
        raise ValueError(f"{derived} are derived from {derived_from}; do not set them")
    TrainOptions.model_validate(v)  # unknown keys and bad values fail here, naming the key
    return v


class PretrainConfig(_Section):
    """Public data every architecture trains on once, centrally and without privacy, first.

    The standard warm start of private training (De et al. 2022; public-data pretraining in DP
    medical imaging): the private steps, each of them noisy under DP-SGD, then fine-tune instead
    of learning from scratch. Every network of one architecture starts from the same weights, so
    a with/without-DP comparison stays paired. It costs no privacy budget only because the data
    are public: the study refuses its own data here.
    """

    data: DataConfig = Field(description="the public data (e.g. data.histology.cohort: public)")
    epochs: int = Field(ge=1, description="passes over the public training data")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="changes to the study's train options for pretraining, e.g. {lr: 0.05}",
    )

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_train_changes(v, derived_from="pretrain.epochs")


class BudgetConfig(_Section):
    pooled_epochs: float = Field(
        gt=0, description="passes over the pooled training data that every paradigm gets"
    )


class StatsConfig(_Section):
    bootstrap_resamples: int = Field(1000, ge=50)
    level: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of every interval")
    seed: int = 0
    hd95: bool = Field(False, description="segmentation: also report the 95% Hausdorff distance")
    overlays_per_site: int = Field(
        2, ge=1, le=8, description="segmentation: example overlays per site in the report"
    )


class StudyConfig(_Section):
    name: str = "study"
    seed: int = 0
    task: Task = Task.CLASSIFICATION
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    networks: list[NetworkSpec] = Field(min_length=1)
    paradigms: list[Paradigm] = Field(
        default_factory=lambda: [Paradigm.CENTRALIZED, Paradigm.FEDERATED, Paradigm.LOCAL]
    )
    budget: BudgetConfig
    train: TrainOptions = Field(default_factory=TrainOptions)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig,
        description="differential privacy for every network (a network's own privacy replaces it)",
    )
    peer: PeerConfig = Field(
        default_factory=PeerConfig,
        description="how peers exchange models (paradigms cyclic and gossip)",
    )
    one_shot: OneShotConfig = Field(
        default_factory=OneShotConfig,
        description="one-shot FedISCA's synthesis and distillation (paradigm one_shot)",
    )
    pretrain: PretrainConfig | None = Field(
        None,
        description="public data each architecture trains on first; every network then starts "
        "from those weights (none: from scratch or its model.pretrained_path)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        derived = sorted(DERIVED_TRAIN_OPTIONS & self.train.model_fields_set)
        if derived:
            raise ValueError(
                f"train.{derived[0]} is derived from budget.pooled_epochs and "
                "federation.rounds (equal budgets); do not set it"
            )
        labels = [n.label for n in self.networks]
        slugs = [n.slug for n in self.networks]
        if len(set(labels)) != len(labels) or len(set(slugs)) != len(slugs):
            raise ValueError(f"network labels must be unique (also as folder names): {labels}")
        for net in self.networks:
            try:
                check_model_task(net.model, self.task)
                # Every run the study will start, checked now: not after hours of training.
                for paradigm in self.paradigms:
                    check_privacy(self.privacy_of(net), self.federation.strategy, paradigm)
            except ValueError as err:
                raise ValueError(f"network {net.label!r}: {err}") from None
        if len(set(self.paradigms)) != len(self.paradigms):
            raise ValueError(f"paradigms listed twice: {[str(p) for p in self.paradigms]}")
        unsupported = [str(p) for p in self.paradigms if p not in STUDY_PARADIGMS]
        if unsupported:
            raise ValueError(
                f"paradigms {unsupported} cannot be compared in a study yet (run them with "
                f"`medfed run`); a study supports {', '.join(str(p) for p in STUDY_PARADIGMS)}"
            )
        decentral = [str(p) for p in self.paradigms if p in DECENTRAL_PARADIGMS]
        if decentral and self.task is not Task.CLASSIFICATION:
            raise ValueError(
                f"paradigms {decentral} are compared in classification studies only (their "
                "per-site and one-shot blocks report AUC/accuracy); remove them from a "
                f"{self.task} study"
            )
        if self.pretrain is not None:
            if self.pretrain.data == self.data:
                raise ValueError(
                    "pretrain.data is the study's own data: pretraining is for public data "
                    "(e.g. data.histology.cohort: public), which costs no privacy budget"
                )
            pre = self.pretrain.data
            if (
                pre.source is self.data.source
                and pre.source is not DataSource.FILES
                and not (
                    pre.source is DataSource.SYNTHETIC_HISTOLOGY
                    and pre.histology.cohort is HistologyCohort.PUBLIC
                )
            ):
                raise ValueError(
                    f"pretrain.data draws the study's own {pre.source} federation (another "
                    "seed or size of it is still the private distribution); use its public "
                    "cohort (data.histology.cohort: public) or public files"
                )
            own = [n.label for n in self.networks if n.model.pretrained_path is not None]
            if own:
                raise ValueError(
                    f"networks {own} set model.pretrained_path and the study sets pretrain; "
                    "a network starts from one of the two (remove one)"
                )
        for net in self.networks:
            privacy = self.privacy_of(net)
            if decentral and (privacy.dp is not None or privacy.he is not None):
                raise ValueError(
                    f"network {net.label!r}: privacy.dp/he need a server that aggregates; "
                    f"paradigms {decentral} have none (give this network privacy: {{}} or "
                    "drop those paradigms)"
                )
        return self

    def privacy_of(self, network: NetworkSpec) -> PrivacyConfig:
        """The privacy ``network`` trains with: its own if it sets one, else the study's."""
        return network.privacy if network.privacy is not None else self.privacy

    def epochs_per_round(self, paradigm: Paradigm) -> float:
        rounds = self.federation.rounds
        share = self.federation.fraction if paradigm is Paradigm.FEDERATED else 1.0
        return self.budget.pooled_epochs / (rounds * share)

    def run_config(
        self, network: NetworkSpec, paradigm: Paradigm, *, init: Path | None = None
    ) -> RunConfig:
        """The ordinary run that trains ``network`` under ``paradigm`` within the study budget.

        ``init``: the weights ``pretrain`` produced for this network's architecture.
        """
        if (init is None) != (self.pretrain is None):
            raise ValueError("init is the pretrained weights, given exactly when pretrain is set")
        train = self.train.model_dump() | network.train
        train["epochs"] = self.epochs_per_round(paradigm)
        model = network.model
        if init is not None:
            model = model.model_copy(update={"pretrained_path": init})
        return RunConfig(
            name=f"{self.name}-{network.slug}-{paradigm}",
            seed=self.seed,
            task=self.task,
            paradigm=paradigm,
            device=self.device,
            data=self.data,
            model=model,
            train=TrainOptions.model_validate(train),
            federation=self.federation,
            validation=self.validation,
            checkpoint=self.checkpoint,
            privacy=self.privacy_of(network),
            peer=self.peer,
            one_shot=self.one_shot,
        )

    def pretrain_config(self, model: str) -> RunConfig:
        """The central run on the public data that initialises every ``model`` network."""
        if self.pretrain is None:
            raise ValueError("the study has no pretrain section")
        train = self.train.model_dump() | self.pretrain.train | {"epochs": 1.0}
        return RunConfig(
            name=f"{self.name}-pretrain-{slugify(model)}",
            seed=self.seed,
            task=self.task,
            paradigm=Paradigm.CENTRALIZED,
            device=self.device,
            data=self.pretrain.data,
            model=ModelConfig(name=model),
            train=TrainOptions.model_validate(train),
            federation=FederationConfig(rounds=self.pretrain.epochs),
            validation=self.validation,
            checkpoint=self.checkpoint,
        )


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def build_study_config(
    raw: dict[str, Any] | None, overrides: Sequence[str] = (), *, source: str = "<study>"
) -> StudyConfig:
    return validate_tree(StudyConfig, raw, overrides, source=source)


def load_study_config(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    return build_study_config(read_yaml(path), overrides, source=str(path))
