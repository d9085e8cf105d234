"""Every input error of a file in one pass: one line each, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adaptune.search.cli import main
from conftest import tiny_experiment, write_experiment


def _errors(err: str) -> list[str]:
    lines = err.splitlines()
    assert lines and all(ln.startswith("adaptune: error: x.yaml: ") for ln in lines), err
    return lines


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_three_schema_errors_are_all_reported(here: Path, capsys) -> None:
    write_experiment(here / "x.yaml", tiny_experiment(
        "x",
        run={"optim": {"lr": -1}},
        space={"learning_rate": {"uniform": [0.1, 0.2]}},
        search={"num_samples": 0},
    ))
    assert main(["search", "x.yaml"]) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 3, lines
    assert any("run.optim.lr:" in ln and "greater than 0" in ln for ln in lines)
    assert any("space:" in ln and "unknown hyperparameter 'learning_rate'" in ln
               and "did you mean 'lr'?" in ln for ln in lines)
    assert any("search.num_samples:" in ln for ln in lines)
    assert sorted(p.name for p in here.iterdir()) == ["x.yaml"]


def test_every_bad_space_key_gets_its_own_line(here: Path, capsys) -> None:
    write_experiment(here / "x.yaml", tiny_experiment(
        "x", space={"ewc_lamda": {"loguniform": [1.0, 10.0]}, "bufer_size": 4, "lr": None},
    ))
    assert main(["train", "x.yaml", "--dry-run"]) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 2, lines
    assert "did you mean 'ewc_lambda'?" in lines[0]
    assert "did you mean 'buffer_size'?" in lines[1]


def test_search_checks_are_all_reported(here: Path, capsys) -> None:
    write_experiment(here / "x.yaml", tiny_experiment(
        "x",
        space={"lr": {"loguniform": [1.0e-4, 10.0]}},  # lr <= 1 in the run schema
        search={"metric": "stream_los", "scheduler": "asha", "grace_period": 9},
    ))
    assert main(["search", "x.yaml", "--dry-run"]) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 3, lines
    assert "search.metric: 'stream_los'" in lines[0] and "did you mean 'stream_loss'?" in lines[0]
    assert "space.lr: the value 10.0 is out of range" in lines[1]
    assert "search.grace_period: must be <= the number of tasks (3)" in lines[2]


def test_data_errors_come_before_the_search_folder_name_clash(here: Path, capsys) -> None:
    data = tiny_experiment("x")
    data["run"]["stream"]["tasks"][0] = {"name": "docs", "files": ["missing.txt"]}
    write_experiment(here / "x.yaml", data)
    folder = here / "runs" / "ray" / "x"  # a finished search of this name
    folder.mkdir(parents=True)
    (folder / "adaptune-search.json").write_text(json.dumps({"state": "finished"}))

    assert main(["search", "x.yaml", "--dry-run"]) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 1 and "run.stream.tasks.0.files: file not found" in lines[0], lines

    (here / "missing.txt").write_text("some text\n" * 400)  # fixed: now the name clash
    assert main(["search", "x.yaml", "--dry-run"]) == 2
    lines = _errors(capsys.readouterr().err)
    assert "already holds a finished search named 'x'" in lines[0], lines
    assert main(["search", "x.yaml", "--dry-run", "--name", "x2"]) == 0
