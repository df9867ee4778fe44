import pytest

from medfed.config import ConfigError
from medfed.study.config import build_study_config, load_study_config
from medfed.types import Paradigm

BASE = {
    "networks": [{"label": "Tiny", "model": {"name": "medfed:tinycnn"}}],
    "budget": {"pooled_epochs": 6},
    "federation": {"rounds": 4},
}


def _cfg(**changes):
    return build_study_config({**BASE, **changes})


def test_equal_budget_splits_pooled_epochs_over_rounds():
    cfg = _cfg()
    net = cfg.networks[0]
    for p in (Paradigm.CENTRALIZED, Paradigm.FEDERATED, Paradigm.LOCAL):
        run = cfg.run_config(net, p)
        assert run.train.epochs == pytest.approx(6 / 4)
        assert run.federation.rounds == 4
        assert run.paradigm is p
    # sampling half the sites per round: each sampled site trains twice as long
    half = _cfg(federation={"rounds": 4, "fraction": 0.5})
    assert half.run_config(net, Paradigm.FEDERATED).train.epochs == pytest.approx(3.0)
    assert half.run_config(net, Paradigm.CENTRALIZED).train.epochs == pytest.approx(1.5)


def test_per_network_train_overrides_are_validated_and_applied():
    cfg = _cfg(
        networks=[
            {"label": "A", "model": {"name": "medfed:tinycnn"}, "train": {"lr": 0.01}},
            {"label": "B", "model": {"name": "medfed:smallcnn"}},
        ],
        train={"lr": 0.1},
    )
    a, b = cfg.networks
    assert cfg.run_config(a, Paradigm.FEDERATED).train.lr == 0.01
    assert cfg.run_config(b, Paradigm.FEDERATED).train.lr == 0.1
    with pytest.raises(ConfigError, match="lrr"):
        _cfg(networks=[{"label": "A", "model": {"name": "medfed:tinycnn"}, "train": {"lrr": 1}}])


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"train": {"epochs": 3}}, "derived from budget"),
        ({"train": {"max_steps": 3}}, "derived from budget"),
        (
            {
                "networks": [
                    {"label": "A", "model": {"name": "medfed:tinycnn"}, "train": {"epochs": 2}}
                ]
            },
            "derived from budget",
        ),
        (
            {
                "networks": [
                    {"label": "A", "model": {"name": "medfed:tinycnn"}},
                    {"label": "A", "model": {"name": "medfed:smallcnn"}},
                ]
            },
            "unique",
        ),
        ({"networks": [{"label": "meta", "model": {"name": "medfed:tinycnn"}}]}, "reserved"),
        ({"networks": [{"label": "X", "model": {"name": "nosuchnet"}}]}, "nosuchnet"),
        ({"budget": {"pooled_epochs": 0}}, "pooled_epochs"),
        ({"paradigms": ["federated", "federated"]}, "twice"),
        ({"paradigms": ["pooled"]}, "paradigms"),
        ({"netwroks": []}, "netwroks"),
    ],
)
def test_bad_study_configs_name_the_field(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(**changes)


@pytest.mark.parametrize("preset", ["configs/study-quickstart.yaml", "configs/lee2021.yaml"])
def test_presets_load(preset):
    from pathlib import Path

    cfg = load_study_config(Path(__file__).parents[2] / preset)
    assert len(cfg.networks) >= 2
    assert set(cfg.paradigms) == {Paradigm.CENTRALIZED, Paradigm.FEDERATED, Paradigm.LOCAL}


def test_lee2021_has_the_five_networks_at_224px():
    from pathlib import Path

    cfg = load_study_config(Path(__file__).parents[2] / "configs/lee2021.yaml")
    assert [n.label for n in cfg.networks] == [
        "VGG19",
        "ResNet50",
        "ResNeXt50",
        "SE-ResNet50",
        "SE-ResNeXt50",
    ]
    assert cfg.data.ultrasound.image_size == 224
