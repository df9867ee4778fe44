from pathlib import Path

import pytest

from medfed.algorithms import STRATEGIES
from medfed.client.augment import Augment
from medfed.config import (
    ConfigError,
    build_config,
    config_changes,
    config_hash,
    dump_config,
    load_config,
    parse_overrides,
    resume_mismatch,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_validates(path):
    """Run presets load as runs, study presets (those listing networks) as studies."""
    import yaml

    from medfed.study import load_study_config

    if "networks" in yaml.safe_load(path.read_text()):
        load_study_config(path)
    else:
        load_config(path)


def test_defaults_and_overrides_parse_yaml_scalars():
    c = build_config(
        {},
        [
            "federation.rounds=3",
            "train.augment=false",
            "train.lr=1e-3",
            "faults=[{site: a, kind: nan}]",
        ],
    )
    assert c.federation.rounds == 3 and c.train.augment is Augment.NONE and c.train.lr == 1e-3
    assert c.faults[0].site == "a"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["federation.roundz=3"], "federation.roundz: unknown key"),
        (["federation.rounds=abc"], "federation.rounds: Input should be a valid integer"),
        (["federation.strategy.name=fedavgg"], "unknown strategy 'fedavgg'; allowed: "),
        (
            ["federation.strategy.name=fedprox", "federation.strategy.options.mue=0.1"],
            "options for strategy 'fedprox': mue: unknown key",
        ),
        (["model.name=medfed:resnet9000"], "unknown model 'medfed:resnet9000'; allowed: "),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (
            ["paradigm=pooled"],
            "paradigm: Input should be 'federated', 'centralized', 'local', 'cyclic', 'gossip' or 'one_shot'",
        ),
        (["device=tpu"], "device must be"),
        (["federation.rounds"], "--set expects KEY=VALUE"),
    ],
)
def test_errors_name_the_field_and_allowed_values(overrides, needle):
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    assert needle in str(err.value)


def test_unknown_strategy_lists_every_registered_name():
    with pytest.raises(ConfigError) as err:
        build_config({}, ["federation.strategy.name=nope"])
    for name in STRATEGIES.names():
        assert name in str(err.value)


def test_hash_is_canonical(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("seed: 1\nfederation:\n  rounds: 4\n  fraction: 1.0\n")
    b.write_text("federation:\n  fraction: 1\n  rounds: 4\nseed: 1\n")
    assert config_hash(load_config(a)) == config_hash(load_config(b))
    assert config_hash(load_config(a)) != config_hash(load_config(a, ["seed=2"]))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_parse_overrides_never_evaluates():
    assert parse_overrides(["a=__import__('os')"]) == [("a", "__import__('os')")]


def test_readme_data_examples_validate():
    """The YAML a user copies from the README must be a valid config."""
    import re

    import yaml

    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "source: files" in b]
    assert len(blocks) >= 2
    for block in blocks:
        build_config(yaml.safe_load(block), source="README.md")


def test_config_changes_names_changed_added_and_dropped_settings() -> None:
    before = {"train": {"lr": 0.05, "old_knob": 1}, "seed": 0, "extra": {}}
    after = {"train": {"lr": 0.01, "new_knob": 0}, "seed": 0, "extra": {}}
    assert config_changes(before, after) == [
        "train.lr: 0.05 -> 0.01",
        "train.new_knob: (absent) -> 0",
        "train.old_knob: 1 -> (absent)",
    ]
    assert config_changes(after, after) == []


def test_resume_mismatch_reads_the_runs_config_yaml(tmp_path: Path) -> None:
    config = build_config({}, ["train.lr=0.01"])
    dump_config(build_config({}, ["train.lr=0.05"]), tmp_path / "config.yaml")
    assert resume_mismatch(tmp_path, config_hash(config), config) is None
    msg = resume_mismatch(tmp_path, "0123abcd", config)
    assert msg is not None and "0123abcd" in msg and "train.lr: 0.05 -> 0.01" in msg
    (tmp_path / "config.yaml").unlink()  # no config.yaml: the hashes alone
    msg = resume_mismatch(tmp_path, "0123abcd", config)
    assert msg is not None and "changed since" not in msg
