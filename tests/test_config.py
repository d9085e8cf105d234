"""Experiment and run config validation: every bad value is one ConfigError naming the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from adaptune.search.experiment import (
    apply_overrides,
    experiment_yaml,
    load_experiment,
    parse_experiment,
    read_yaml,
)
from adaptune.spaces import Dist
from adaptune.trainables.config import HYPERPARAMETERS, RunConfig, parse_run_config
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment

REPO = Path(__file__).resolve().parents[1]

BASE = tiny_experiment(
    "unit",
    run={
        "model": {"n_head": 4},
        "stream": {
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "code", "builtin": "python_source"},
            ],
        },
        "optim": {"lr": 1e-3},
        "components": {"replay": {"buffer_size": 16}},
    },
)


def edit(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    fn(data)
    return data


def setpath(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(data: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node = data
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value

    return fn


CASES = [
    # (id, mutation, substrings the message must contain: field path, rule / valid values)
    ("negative lr", setpath("run.optim.lr", -1e-3),
     ["run.optim.lr:", "greater than 0", "-0.001"]),
    ("lr above 1", setpath("run.optim.lr", 2.0),
     ["run.optim.lr:", "less than or equal to 1", "2.0"]),
    ("negative buffer_size", setpath("run.components.replay.buffer_size", -1),
     ["run.components.replay.buffer_size:", "greater than or equal to 0"]),
    ("replay_fraction 1.0", setpath("run.components.replay.replay_fraction", 1.0),
     ["run.components.replay.replay_fraction:", "less than 1", "1.0"]),
    ("replay_fraction -0.1", setpath("run.components.replay.replay_fraction", -0.1),
     ["run.components.replay.replay_fraction:", "greater than or equal to 0", "-0.1"]),
    ("unknown top-level key", setpath("serach", {}),
     ["serach: unknown key", "valid keys: name, run, space, search, resources, tracking"]),
    ("unknown run key", setpath("run.lr", 1e-3),
     ["run.lr: unknown key", "valid keys: seed, model, stream, optim, components"]),
    ("unknown optim key", setpath("run.optim.momentum", 0.9),
     ["run.optim.momentum: unknown key", "valid keys: lr, batch_size, epochs, schedule"]),
    ("unknown component", setpath("run.components.foo", {}),
     ["run.components.foo: unknown key", "valid keys: replay, ewc, distill"]),
    ("unknown key inside a component", setpath("run.components.ewc.lambda", 1.0),
     ["run.components.ewc.lambda: unknown key", "valid keys: ewc_lambda, ewc_mode"]),
    ("unknown builtin domain", setpath("run.stream.tasks.1.builtin", "wikipedia"),
     ["run.stream.tasks.1.builtin:", "'python_docs'", "'python_source'", "'unicode_names'",
      "'wikipedia'"]),
    ("builtin source without builtin", setpath("run.stream.tasks", [{"name": "x"}]),
     ["run.stream.tasks.0:", "needs the field `builtin`", "python_docs, python_source"]),
    ("files source without files",
     setpath("run.stream.tasks", [{"name": "x", "source": "files"}]),
     ["run.stream.tasks.0:", "source `files` needs the field `files`"]),
    ("hf source without path", setpath("run.stream.tasks", [{"name": "x", "source": "hf"}]),
     ["run.stream.tasks.0:", "source `hf` needs the field `path`"]),
    ("unknown task key", setpath("run.stream.tasks.0.colum", "text"),
     ["run.stream.tasks.0.colum: unknown key", "text_field"]),
    ("duplicate task names", setpath("run.stream.tasks.1.name", "docs"),
     ["run.stream:", "unique", "['docs']"]),
    ("no tasks", setpath("run.stream.tasks", []),
     ["run.stream.tasks:", "at least 1"]),
    ("n_embd not divisible by n_head", setpath("run.model.n_head", 3),
     ["run.model:", "n_embd % n_head == 0", "n_embd=32", "n_head=3"]),
    ("pretrain with a transformers model",
     setpath("run.model", {"name": "gpt2", "pretrain": {"domain": {"name": "b",
                                                                   "builtin": "python_docs"}}}),
     ["run.model:", "`pretrain` applies only", "tiny-gpt"]),
    ("space: unknown hyperparameter", setpath("space", {"learning_rate": {"uniform": [0, 1]}}),
     ["space:", "'learning_rate'", "valid keys: seed, lr,", "buffer_size", "ewc_lambda"]),
    ("space: low == high", setpath("space", {"replay_fraction": {"uniform": [0.5, 0.5]}}),
     ["space:", "replay_fraction", "`low < high`", "low=0.5, high=0.5"]),
    ("space: low > high", setpath("space", {"buffer_size": {"int": [512, 0]}}),
     ["space:", "buffer_size", "`low < high`"]),
    ("space: loguniform low 0", setpath("space", {"lr": {"loguniform": [0.0, 1e-2]}}),
     ["space:", "lr", "`low > 0`", "loguniform", "low=0.0"]),
    ("space: loguniform low < 0", setpath("space", {"ewc_lambda": {"loguniform": [-1, 10]}}),
     ["space:", "ewc_lambda", "`low > 0`"]),
    ("space: unknown distribution kind", setpath("space", {"lr": {"normal": [0, 1]}}),
     ["space:", "lr.normal", "unknown distribution", "loguniform, uniform, int, choice"]),
    ("space: two distributions", setpath("space", {"lr": {"uniform": [0, 1], "int": [0, 1]}}),
     ["space:", "lr", "exactly one distribution", "loguniform, uniform, int, choice"]),
    ("space: empty choice", setpath("space", {"ewc_mode": {"choice": []}}),
     ["space:", "ewc_mode.choice", "at least 1"]),
    ("space: list instead of distribution", setpath("space", {"lr": [1e-4, 1e-2]}),
     ["space:", "lr", "fixed value or one of loguniform, uniform, int, choice"]),
    ("bad ewc_mode", setpath("run.components.ewc.ewc_mode", "offline"),
     ["run.components.ewc.ewc_mode:", "'separate'", "'online'", "'offline'"]),
    ("schedule not constant/cosine", setpath("run.optim.schedule", "linear"),
     ["run.optim.schedule:", "'constant'", "'cosine'", "'linear'"]),
    ("ewc_gamma above 1", setpath("run.components.ewc.ewc_gamma", 1.5),
     ["run.components.ewc.ewc_gamma:", "less than or equal to 1"]),
    ("temperature 0", setpath("run.components.distill.temperature", 0),
     ["run.components.distill.temperature:", "greater than 0"]),
    ("block_size below 8", setpath("run.stream.block_size", 4),
     ["run.stream.block_size:", "greater than or equal to 8"]),
    ("lr not a number", setpath("run.optim.lr", "fast"),
     ["run.optim.lr:", "valid number", "'fast'"]),
    ("lr NaN", setpath("run.optim.lr", float("nan")), ["run.optim.lr:"]),
    ("bad experiment name", setpath("name", "my run"),
     ["name:", "pattern", "'my run'"]),
    ("stream missing", lambda d: d["run"].pop("stream"),
     ["run.stream: required field is missing"]),
    ("unknown search algorithm", setpath("search", {"algorithm": "bohb"}),
     ["search.algorithm:", "'tpe'", "'random'", "'bohb'"]),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_experiment_raises_config_error(
    mutate: Callable[[dict[str, Any]], None], expected: list[str]
) -> None:
    data = edit(mutate)
    with pytest.raises(ConfigError) as err:
        parse_experiment(data, source="exp.yaml")
    msg = str(err.value)
    assert msg.startswith("exp.yaml: "), msg
    assert "\n" not in msg, msg  # one line
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_base_experiment_is_valid() -> None:
    exp = parse_experiment(copy.deepcopy(BASE))
    assert exp.run.components.replay.buffer_size == 16
    assert isinstance(exp.space["lr"], Dist) and exp.space["lr"].kind == "loguniform"


def test_every_distribution_kind_parses() -> None:
    space = {
        "lr": {"loguniform": [1e-4, 1e-2]},
        "replay_fraction": {"uniform": [0.1, 0.5]},
        "buffer_size": {"int": [0, 2048]},
        "ewc_mode": {"choice": ["separate", "online"]},
        "temperature": 2.0,
    }
    exp = parse_experiment(edit(setpath("space", space)))
    assert exp.space["buffer_size"].kind == "int"
    assert exp.space["buffer_size"].values() == (0, 2048)
    assert exp.space["replay_fraction"].values() == (0.1, 0.5)
    assert exp.space["ewc_mode"].values() == ["separate", "online"]
    assert exp.space["temperature"] == 2.0


def test_int_distribution_rejects_fractional_bounds() -> None:
    with pytest.raises(ConfigError, match=r"space: buffer_size\.int\.0: .*integer"):
        parse_experiment(edit(setpath("space", {"buffer_size": {"int": [0.5, 10]}})))


def test_parse_run_config_errors_are_prefixed_with_run() -> None:
    run = copy.deepcopy(BASE["run"])
    run["optim"]["lr"] = 0
    with pytest.raises(ConfigError, match=r"^run\.optim\.lr: Input should be greater than 0"):
        parse_run_config(run)
    run = copy.deepcopy(BASE["run"])
    run["components"]["bogus"] = {}
    with pytest.raises(ConfigError, match=r"^run\.components\.bogus: unknown key; valid keys: "
                                          r"replay, ewc, distill, self_replay$"):
        parse_run_config(run)


def test_parse_run_config_round_trips_a_dump() -> None:
    cfg = parse_experiment(copy.deepcopy(BASE)).run
    assert parse_run_config(cfg.model_dump(mode="json")) == cfg


def test_hyperparameter_paths_point_into_the_run_config() -> None:
    cfg = RunConfig.model_validate(BASE["run"])
    for name, path in HYPERPARAMETERS.items():
        node: Any = cfg
        for part in path:
            node = getattr(node, part)
        assert path[-1] == name or (name, path) == ("update_mode", ("update", "mode"))
    assert HYPERPARAMETERS["lr"] == ("optim", "lr")
    assert HYPERPARAMETERS["buffer_size"] == ("components", "replay", "buffer_size")
    assert HYPERPARAMETERS["temperature"] == ("components", "distill", "temperature")


# ---- YAML --------------------------------------------------------------------------------------


def test_read_yaml_malformed_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nrun:\n  optim: {lr: 1e-3\n  seed: 1\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: invalid YAML: line ")
    assert ", column " in msg


def test_read_yaml_malformed_position_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "tab.yaml"
    path.write_text("name: x\nrun:\n\tseed: 1\n")  # a tab at line 3, column 1
    with pytest.raises(ConfigError, match=r"invalid YAML: line 3, column 1: "):
        read_yaml(path)


def test_read_yaml_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\nrun:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"line 4, column 3: duplicate key 'seed'"):
        read_yaml(path)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"),
                                            ("", "NoneType")])
def test_read_yaml_non_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"must hold a YAML mapping \(got {kind}\)"):
        read_yaml(path)


def test_read_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment file not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_read_yaml_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(path)


# ---- overrides ----------------------------------------------------------------------------------


def test_apply_overrides_changes_the_right_fields() -> None:
    data = copy.deepcopy(BASE)
    out = apply_overrides(data, ["lr=3e-4", "run.stream.block_size=64", "buffer_size=0"])
    assert data == BASE  # the input is not modified
    exp = parse_experiment(out)
    assert exp.run.optim.lr == pytest.approx(3e-4)
    assert exp.run.stream.block_size == 64
    assert exp.run.components.replay.buffer_size == 0
    # everything else as before
    before = parse_experiment(copy.deepcopy(BASE))
    assert exp.run.model == before.run.model
    assert exp.run.stream.tasks == before.run.stream.tasks
    assert exp.run.optim.model_copy(update={"lr": before.run.optim.lr}) == before.run.optim


def test_apply_overrides_creates_missing_sections_and_parses_yaml() -> None:
    out = apply_overrides(
        copy.deepcopy(BASE),
        [
            "ewc_mode=online",
            "run.components.ewc.ewc_lambda=10",
            "space.lr={uniform: [0.001, 0.01]}",
        ],
    )
    exp = parse_experiment(out)
    assert exp.run.components.ewc.ewc_mode == "online"
    assert exp.run.components.ewc.ewc_lambda == 10.0
    assert exp.space["lr"].kind == "uniform"


@pytest.mark.parametrize(
    ("item", "match"),
    [("lr", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"), ("name.x=1", "not a mapping")],
)
def test_bad_overrides(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(copy.deepcopy(BASE), [item])


def test_override_to_a_bad_value_is_caught_by_validation() -> None:
    with pytest.raises(ConfigError, match=r"run\.optim\.lr: Input should be less than or equal"):
        parse_experiment(apply_overrides(copy.deepcopy(BASE), ["lr=5"]))


def test_search_mode_is_the_metrics_direction_when_absent() -> None:
    def load(*overrides: str) -> Any:
        return parse_experiment(apply_overrides(copy.deepcopy(BASE), list(overrides)))

    assert load().search.mode == "min"  # stream_loss
    bwt = load("search.metric=bwt")
    assert bwt.search.mode == "max"
    assert "mode: max" in experiment_yaml(bwt)  # written out: best.yaml and the hash carry it
    assert parse_experiment(yaml.safe_load(experiment_yaml(bwt))) == bwt
    assert load("search.metric=loss/code").search.mode == "min"
    assert load("search.metric=base_ppl").search.mode == "min"
    # a given mode stays as given: the search refuses one against the metric (test_bad_experiments)
    assert load("search.metric=bwt", "search.mode=min").search.mode == "min"
    assert load("search.metric=no_such_metric").search.mode == "min"  # the metric is refused


# ---- the shipped experiment -------------------------------------------------------------------


def test_quickstart_loads() -> None:
    exp = load_experiment(REPO / "experiments" / "quickstart.yaml")
    assert exp.name == "quickstart"
    assert [t.builtin for t in exp.run.stream.tasks] == [
        "python_docs", "python_source", "unicode_names"
    ]
    assert exp.run.optim.lr == pytest.approx(2e-3)
    assert exp.run.stream.block_size <= exp.run.model.n_positions
    assert set(exp.space) <= set(HYPERPARAMETERS)


def test_quickstart_with_overrides() -> None:
    exp = load_experiment(
        REPO / "experiments" / "quickstart.yaml", ["lr=3e-4", "run.stream.block_size=64"]
    )
    assert exp.run.optim.lr == pytest.approx(3e-4)
    assert exp.run.stream.block_size == 64


def test_search_trials_get_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray runs trials in their own folders: relative local paths are resolved on the driver."""
    from adaptune.trainables.config import parse_run_config
    from adaptune.trainables.config_paths import with_absolute_paths

    (tmp_path / "data").mkdir()
    (tmp_path / "data/a.txt").write_text("hello\n")
    (tmp_path / "local-ds").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = parse_run_config(
        {
            "model": {"pretrain": {"domain": {"name": "b", "builtin": "python_docs"}}},
            "stream": {
                "tasks": [
                    {"name": "a", "source": "files", "files": ["data/a.txt"]},
                    {"name": "hub", "source": "hf", "path": "wikitext"},
                    {"name": "dir", "source": "hf", "path": "local-ds"},
                ]
            },
        }
    )
    fixed = with_absolute_paths(cfg, tmp_path)
    assert fixed.stream.tasks[0].files == [str(tmp_path / "data/a.txt")]
    assert fixed.stream.tasks[1].path == "wikitext"  # a hub name stays a hub name
    assert fixed.stream.tasks[2].path == str(tmp_path / "local-ds")
    assert fixed.model.name == "tiny-gpt"
    assert fixed.model.pretrain is not None
    assert fixed.model.pretrain.cache_dir == str(tmp_path / "runs/cache")
