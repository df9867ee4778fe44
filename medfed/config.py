"""Validated run configuration: YAML presets + ``--set a.b=c`` overrides -> pydantic models.

Every section forbids unknown keys, so a typo is an error naming the field, not a silently ignored
setting. Component names (strategy, model) are checked against their registries here, before any
data is generated or any model is built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medfed.audit.config import LedgerConfig
from medfed.client.train import TrainOptions
from medfed.data.sources.federation import FilesDataConfig
from medfed.data.synthetic.histology import HistologyOptions
from medfed.data.synthetic.ultrasound import UltrasoundOptions
from medfed.privacy.config import PrivacyConfig
from medfed.registry import UnknownComponentError
from medfed.topologies.config import OneShotConfig, PeerConfig
from medfed.types import Paradigm, StrEnum, Task

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem, reported as one readable message (the CLI prints it, no traceback)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(StrEnum):
    SYNTHETIC_ULTRASOUND = "synthetic_ultrasound"
    SYNTHETIC_HISTOLOGY = "synthetic_histology"
    FILES = "files"


class DataConfig(_Section):
    source: DataSource = DataSource.SYNTHETIC_ULTRASOUND
    ultrasound: UltrasoundOptions = Field(
        default_factory=UltrasoundOptions,
        description="thyroid ultrasound: benign/malignant labels and nodule masks",
    )
    histology: HistologyOptions = Field(
        default_factory=HistologyOptions,
        description="H&E histology tiles with tumour masks (source: synthetic_histology)",
    )
    files: FilesDataConfig | None = Field(
        None,
        description="real data: sites from CSV folders, DICOM, NIfTI or MedMNIST files "
        "(source: files)",
    )
    cache_dir: str | None = Field(
        None,
        description="where generated federations are cached; default $MEDFED_CACHE_DIR or "
        "~/.cache/medfed",
    )

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source is DataSource.FILES and self.files is None:
            raise ValueError("source 'files' needs a files section (sites or pooled + partition)")
        if self.source is not DataSource.FILES and self.files is not None:
            raise ValueError(f"a files section is only read with source: files, not {self.source}")
        return self


class ModelConfig(_Section):
    name: str = "medfed:smallcnn"
    pretrained_path: Path | None = None
    freeze_backbone: bool = False

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from medfed.models.factory import check_model_name

        try:
            return check_model_name(v)
        except UnknownComponentError as err:
            raise ValueError(str(err)) from None


class StrategyConfig(_Section):
    name: str = "fedavg"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_strategy(self) -> StrategyConfig:
        from medfed.algorithms import STRATEGIES

        try:
            opts_model = STRATEGIES.options(self.name)
        except UnknownComponentError as err:
            raise ValueError(str(err)) from None
        if opts_model is None:
            if self.options:
                raise ValueError(f"strategy {self.name!r} takes no options")
            return self
        try:
            opts_model.model_validate(self.options)
        except ValidationError as err:
            raise ValueError(f"options for strategy {self.name!r}: {_describe(err)}") from None
        return self


class FederationConfig(_Section):
    rounds: int = Field(10, ge=1)
    fraction: float = Field(1.0, gt=0, le=1, description="share of sites sampled each round")
    min_clients: int = Field(
        2, ge=1, description="fewest sampled sites per round, and fewest valid updates to go on"
    )
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)


class ValidationConfig(_Section):
    max_relative_update_norm: float = Field(
        10.0,
        gt=0,
        description="reject an update whose change ||w - w_global|| exceeds this times ||w_global||",
    )


class FaultKind(StrEnum):
    RAISE = "raise"
    DROP = "drop"
    NAN = "nan"
    WRONG_SHAPE = "wrong_shape"
    SCALE = "scale"


class FaultConfig(_Section):
    """A deliberately misbehaving site, for testing that the federation survives it."""

    site: str
    kind: FaultKind
    rounds: list[int] | None = Field(None, description="rounds (0-based) it misbehaves; None = all")
    factor: float = 100.0


class VectorizeMode(StrEnum):
    AUTO = "auto"
    OFF = "off"
    ON = "on"


class RuntimeConfig(_Section):
    """How the in-process simulator carries a round (results agree within float tolerance)."""

    vectorize: VectorizeMode = Field(
        VectorizeMode.AUTO,
        description="train a round's clients as one vmapped computation: auto on a GPU where it "
        "applies and at least vector_min_clients sites take the same number of steps; on: on "
        "any device, and an unsupported setup is an error naming why; off: one site at a time",
    )
    vector_min_clients: int = Field(
        8, ge=1, description="auto: fewest sites of equal step count worth vectorising"
    )
    vector_chunk: int = Field(
        256, ge=1, description="most sites per vmapped computation (bounds activation memory)"
    )
    site_metrics: bool = Field(
        True,
        description="score each site's validation split every round; false: pooled validation "
        "only (federations of hundreds of sites, when no site uses a personal model)",
    )

    @field_validator("vectorize", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: object) -> object:
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class CheckpointConfig(_Section):
    keep_last: int = Field(2, ge=1)


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    task: Task = Field(
        Task.CLASSIFICATION,
        description="classification (a label per image) or segmentation (a label per pixel)",
    )
    paradigm: Paradigm = Paradigm.FEDERATED
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainOptions = Field(default_factory=TrainOptions)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    faults: list[FaultConfig] = Field(default_factory=list)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig,
        description="in-process simulator: vectorised client training, per-site evaluation",
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig,
        description="differential privacy (privacy.dp) and encrypted aggregation (privacy.he)",
    )
    peer: PeerConfig = Field(
        default_factory=PeerConfig,
        description="peer-to-peer exchange (paradigm: cyclic or gossip); ignored otherwise",
    )
    one_shot: OneShotConfig = Field(
        default_factory=OneShotConfig,
        description="one-shot FedISCA (paradigm: one_shot); ignored otherwise",
    )
    ledger: LedgerConfig = Field(
        default_factory=LedgerConfig,
        description="the signed, hash-chained ledger of every update (medfed.audit)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @model_validator(mode="after")
    def _model_fits_task(self) -> RunConfig:
        check_model_task(self.model, self.task)
        check_privacy(self.privacy, self.federation.strategy, self.paradigm)
        return self


def check_device(v: str) -> str:
    if v not in {"auto", "cpu"} and not v.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {v!r}")
    return v


def check_model_task(model: ModelConfig, task: Task) -> None:
    """A classifier cannot segment and a U-Net cannot classify: say so before anything runs."""
    from medfed.models.factory import model_task

    kind = model_task(model.name)
    if kind is not task:
        raise ValueError(
            f"model {model.name!r} is a {kind} network but the task is {task}; choose a "
            + (
                "segmentation network, e.g. medfed:smallunet or monai:unet"
                if task is Task.SEGMENTATION
                else "classification network, e.g. medfed:smallcnn or timm:resnet50"
            )
        )


def check_privacy(privacy: PrivacyConfig, strategy: StrategyConfig, paradigm: Paradigm) -> None:
    """Privacy settings that would make a false claim are config errors (medfed.privacy)."""
    if privacy.he is not None and paradigm is Paradigm.FEDERATED:
        from medfed.privacy.run import HE_STRATEGIES

        if strategy.name not in HE_STRATEGIES:
            raise ValueError(
                f"privacy.he sums encrypted updates with plaintext weights: strategy "
                f"{strategy.name!r} is not that plain weighted mean (use one of "
                f"{', '.join(sorted(HE_STRATEGIES))})"
            )
    if privacy.dp is None:
        return
    from medfed.privacy.dp import check_strategy

    # Centralized and local-only runs train with FedAvg whatever the federation's strategy is.
    name = strategy.name if paradigm is Paradigm.FEDERATED else "fedavg"
    check_strategy(privacy.dp, name, strategy.options)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``a.b=c`` pairs; values are parsed as YAML scalars/lists (safe_load, never eval)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from None
        out.append((key.strip(), value))
    return out


def validate_tree(
    model: type[M], raw: Mapping[str, Any] | None, overrides: Sequence[str] = (), *, source: str
) -> M:
    """Apply ``--set`` overrides to a raw mapping and validate it as ``model`` (any config kind)."""
    tree: dict[str, Any] = json.loads(json.dumps(dict(raw or {}), default=str))
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}: {_describe(err)}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def build_config(
    raw: Mapping[str, Any] | None, overrides: Sequence[str] = (), *, source: str = "<config>"
) -> RunConfig:
    return validate_tree(RunConfig, raw, overrides, source=source)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    return build_config(read_yaml(path), overrides, source=str(path))


def config_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_hash(config: BaseModel) -> str:
    """Canonical hash: the same settings give the same hash whatever the YAML layout or key order."""
    blob = json.dumps(config_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_config(config: BaseModel, path: str | Path) -> None:
    text = f"# medfed resolved config; hash {config_hash(config)}\n" + yaml.safe_dump(
        config_dict(config), sort_keys=False
    )
    Path(path).write_text(text)


_MISSING = object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): tree}


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Settings that differ between two resolved configs, as ``a.b: old -> new`` lines.

    A run folder's ``config.yaml`` was resolved by the medfed that started it, so a setting a
    newer medfed added shows as ``(absent)``: the user sees which key stops the resume, not two
    opaque hashes.
    """
    old, new = _flatten(before), _flatten(after)
    return [
        f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    ]


def changed_settings(before: Mapping[str, Any], after: Mapping[str, Any], *, most: int = 8) -> str:
    """:func:`config_changes` as one line for an error message (the first ``most`` of them)."""
    changes = config_changes(before, after)
    return "; ".join(changes[:most]) + ("; ..." if len(changes) > most else "")


def resume_mismatch(out_dir: Path, written_hash: object, config: BaseModel) -> str | None:
    """Why ``out_dir``'s checkpoint (made by the config hashed ``written_hash``) must not resume
    under ``config``, naming the settings that differ (from the ``config.yaml`` the run wrote at
    its start); None when the configs agree."""
    chash = config_hash(config)
    if written_hash == chash:
        return None
    msg = f"{out_dir}: checkpoint was written by config {written_hash}, not {chash}"
    saved = out_dir / "config.yaml"
    if saved.is_file():
        try:
            before = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            before = None
        if isinstance(before, Mapping):
            shown = changed_settings(before, config_dict(config))
            if shown:
                msg += f" (changed since its {saved.name}: {shown})"
    return msg + "; refusing to mix runs"
