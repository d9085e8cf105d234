"""``--set``: malformed values, pinning a searched hyperparameter, YAML 1.2 numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from adaptune.search.cli import main
from adaptune.search.experiment import load_experiment
from adaptune.spaces import Dist
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment

TWO_DISTS = {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "buffer_size": {"choice": [0, 16]}}


@pytest.fixture
def exp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_experiment(tmp_path / "x.yaml", tiny_experiment("x", space=TWO_DISTS))


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("adaptune: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "item"),
    [
        (["train", "x.yaml", "--set", "run.optim=[1"], "run.optim=[1"),
        (["search", "x.yaml", "--set", "lr={loguniform: [1e-4", "--dry-run"],
         "lr={loguniform: [1e-4"),
    ],
)
def test_malformed_set_value_is_one_line_exit_2(exp_file: Path, capsys, argv, item) -> None:
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--set {item!r}" in line and "not valid YAML" in line
    assert sorted(p.name for p in exp_file.parent.iterdir()) == ["x.yaml"]  # nothing written


def test_set_pins_a_searched_hyperparameter(exp_file: Path, capsys) -> None:
    exp = load_experiment(exp_file, ["lr=3e-4"])
    assert exp.space["lr"] == 3e-4 and exp.run.optim.lr == 3e-4
    assert isinstance(exp.space["buffer_size"], Dist)

    assert main(["search", "x.yaml", "--set", "lr=3e-4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.0003 (fixed by --set)" in out
    assert "searched:   1 hyperparameters" in out
    assert "loguniform" not in out  # the distribution is gone from this search


def test_pinning_the_only_distribution_leaves_nothing_to_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "x.yaml", tiny_experiment("x"))  # space: lr only
    assert main(["search", "x.yaml", "--set", "lr=3e-4", "--dry-run"]) == 2
    assert "space: nothing to search" in _one_error_line(capsys.readouterr().err)


def test_pin_through_a_preset(tmp_path: Path) -> None:
    path = write_experiment(tmp_path / "x.yaml", tiny_experiment("x", space={"preset": "all"}))
    exp = load_experiment(path, ["lr=3e-4"])
    assert exp.space["lr"] == 3e-4
    assert isinstance(exp.space["ewc_lambda"], Dist)


def test_space_values_parse_as_numbers_and_distributions(exp_file: Path) -> None:
    exp = load_experiment(exp_file, ["space.lr=3e-4"])
    assert exp.space["lr"] == 3e-4 and isinstance(exp.space["lr"], float)
    exp = load_experiment(exp_file, ["space.lr={loguniform: [1e-4, 1e-3]}"])
    assert exp.space["lr"] == Dist(loguniform=(1e-4, 1e-3))


def test_exponent_numbers_in_the_file_and_exact_integers(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    write_experiment(path, tiny_experiment("x"))
    text = path.read_text().replace("max_train_tokens: 1024", "max_train_tokens: 1e5")
    path.write_text(text.replace("schedule: constant", "schedule: constant\n    lr: 3e-4"))
    exp = load_experiment(path)
    assert exp.run.stream.max_train_tokens == 100000
    assert isinstance(exp.run.stream.max_train_tokens, int)
    assert exp.run.optim.lr == 3e-4
    assert load_experiment(path, ["run.stream.block_size=6.4e1"]).run.stream.block_size == 64
    with pytest.raises(ConfigError, match="block_size: .*fractional part"):
        load_experiment(path, ["run.stream.block_size=6.45e1"])
