"""Space specs -> Ray Tune domains -> Optuna distributions; presets; the Tune param_space."""

from __future__ import annotations

import copy
import math

import optuna
import pytest
from adaptune.search.experiment import parse_experiment
from adaptune.spaces import Dist
from adaptune.spaces.paths import from_tune_key, get_hp, set_hp, tune_key
from adaptune.spaces.tune import PRESETS, build_param_space, searched_names, space_to_tune, to_tune
from adaptune.trainables.config import HYPERPARAMETERS, parse_run_config
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform


def test_each_kind_maps_to_its_tune_domain() -> None:
    lr = to_tune(Dist(loguniform=(1e-4, 1e-2)))
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform)
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    frac = to_tune(Dist(uniform=(0.1, 0.5)))
    assert isinstance(frac, Float) and (frac.lower, frac.upper) == (0.1, 0.5)
    size = to_tune(Dist(int=(0, 64)))
    assert isinstance(size, Integer) and (size.lower, size.upper) == (0, 65)  # exclusive in Tune
    mode = to_tune(Dist(choice=["separate", "online"]))
    assert isinstance(mode, Categorical) and mode.categories == ["separate", "online"]
    assert to_tune(2.0) == 2.0


def test_int_high_is_inclusive_after_optuna_conversion() -> None:
    dists = OptunaSearch.convert_search_space({"b": to_tune(Dist(int=(0, 64)))})
    assert dists["b"] == optuna.distributions.IntDistribution(0, 64)
    samples = {to_tune(Dist(int=(0, 2))).sample() for _ in range(200)}
    assert samples == {0, 1, 2}


def test_space_to_tune_accepts_raw_yaml_and_rejects_unknown_names() -> None:
    domains = space_to_tune({"lr": {"loguniform": [1e-4, 1e-2]}, "temperature": 2.0})
    assert isinstance(domains["lr"], Float) and domains["temperature"] == 2.0
    near = r"unknown hyperparameter 'learning_rate' \(did you mean 'lr'\?\); valid keys"
    with pytest.raises(ValueError, match=near):
        space_to_tune({"learning_rate": {"uniform": [0, 1]}})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_name_real_hyperparameters_and_convert(preset: str) -> None:
    space = PRESETS[preset]
    assert set(space) <= set(HYPERPARAMETERS)
    domains = space_to_tune(space)
    assert all(isinstance(d, Float | Integer | Categorical) for d in domains.values())
    assert OptunaSearch.convert_search_space(domains)  # Optuna accepts every domain
    assert searched_names(space) == list(space)


def test_all_preset_covers_the_design_knobs_with_literature_ranges() -> None:
    space = PRESETS["all"]
    for name in (
        "lr",
        "ewc_lambda",
        "distill_alpha",
        "buffer_size",
        "replay_fraction",
        "temperature",
    ):
        assert name in space
    low, high = space["ewc_lambda"]["loguniform"]
    assert math.log10(high / low) >= 6  # EWC λ spans many decades
    assert space["lr"]["loguniform"][1] <= 3e-3


def test_preset_extremes_are_valid_run_configs() -> None:
    base = {"stream": {"tasks": [{"name": "a", "builtin": "python_docs"}]}}
    for space in PRESETS.values():
        for name, spec in space.items():
            for value in next(iter(spec.values())):
                data = copy.deepcopy(base)
                set_hp(data, name, value)
                assert get_hp(parse_run_config(data).model_dump(mode="json"), name) == value


def test_hyperparameters_are_read_and_written_by_name() -> None:
    config = {"optim": {"lr": 1e-3}}
    set_hp(config, "lr", 3e-4)
    set_hp(config, "buffer_size", 16)  # missing mappings are created on the way
    assert config == {"optim": {"lr": 3e-4}, "components": {"replay": {"buffer_size": 16}}}
    assert get_hp(config, "buffer_size") == 16
    assert tune_key("buffer_size") == "components/replay/buffer_size"
    assert from_tune_key("components/replay/buffer_size") == "buffer_size"
    assert from_tune_key("not/a/hyperparameter") == "not/a/hyperparameter"
    assert all(from_tune_key(tune_key(name)) == name for name in HYPERPARAMETERS)
    with pytest.raises(TypeError, match="'optim' is not a mapping"):
        set_hp({"optim": 1.0}, "lr", 1e-3)
    with pytest.raises(KeyError):
        get_hp({}, "lr")


def test_the_space_is_parsed_once_when_the_experiment_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import adaptune.search.experiment
    import adaptune.spaces
    import adaptune.spaces.tune
    from adaptune.search.checks import check_space_bounds

    parsed: list[dict] = []

    def counting(space: dict) -> dict:
        parsed.append(space)
        return adaptune.spaces.check_space(space)

    monkeypatch.setattr(adaptune.search.experiment, "check_space", counting)
    monkeypatch.setattr(adaptune.spaces.tune, "check_space", counting)
    exp = parse_experiment(
        {
            "name": "s",
            "run": {"stream": {"tasks": [{"name": "a", "builtin": "python_docs"}]}},
            "space": {"preset": "ewc", "temperature": 3.0},
        }
    )
    assert isinstance(exp.space["ewc_lambda"], Dist)  # the preset expanded, its entries parsed
    assert exp.space["temperature"] == 3.0
    domain = build_param_space(exp)["components"]["ewc"]["ewc_lambda"]
    assert isinstance(domain, Float) and isinstance(domain.get_sampler(), LogUniform)
    check_space_bounds(exp)
    assert len(parsed) == 1


def test_build_param_space_replaces_leaves_in_the_run_config() -> None:
    exp = parse_experiment(
        {
            "name": "s",
            "run": {"stream": {"tasks": [{"name": "a", "builtin": "python_docs"}]}},
            "space": {
                "lr": {"loguniform": [1e-4, 1e-2]},
                "buffer_size": {"int": [0, 64]},
                "ewc_mode": {"choice": ["separate", "online"]},
                "temperature": 3.0,
            },
        }
    )
    space = build_param_space(exp)
    assert isinstance(space["optim"]["lr"], Float)
    assert isinstance(space["components"]["replay"]["buffer_size"], Integer)
    assert isinstance(space["components"]["ewc"]["ewc_mode"], Categorical)
    assert space["components"]["distill"]["temperature"] == 3.0
    assert space["optim"]["batch_size"] == exp.run.optim.batch_size  # untouched
    # a sampled point is a valid run config
    sampled = tune.search.variant_generator.generate_variants(space)
    _, config = next(sampled)
    cfg = parse_run_config(config)
    assert 1e-4 <= cfg.optim.lr <= 1e-2 and 0 <= cfg.components.replay.buffer_size <= 64


def test_a_preset_is_usable_from_an_experiment_with_overrides() -> None:
    from adaptune.search.experiment import load_experiment
    from adaptune.spaces.presets import PRESETS

    exp = load_experiment(
        "experiments/quickstart.yaml",
        ["space={preset: all, lr: {loguniform: [1.0e-4, 1.0e-3]}}"],
    )
    assert set(exp.space) == set(PRESETS["all"])
    assert isinstance(exp.space["lr"], Dist)
    assert tuple(exp.space["lr"].values()) == (1e-4, 1e-3)


def test_an_unknown_preset_lists_the_valid_ones() -> None:
    from adaptune.search.experiment import load_experiment
    from adaptune.trainables.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"space: preset: unknown preset 'lwf'; valid values: replay, ewc"
    ):
        load_experiment("experiments/quickstart.yaml", ["space={preset: lwf}"])
