"""Bad experiment files through ``adaptune search``: one line, exit code 2, nothing written.

Each case is a whole experiment file (YAML text, or the good one below with one change) that
``adaptune search FILE`` must refuse before Ray starts: the message is one line on stderr naming
the file, the field path and the rule or the valid values, and no ``runs/`` directory (Ray
results, Optuna study, MLflow database) appears. Most cases run through ``main()`` in-process;
a few through the real console entry point in a subprocess.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from adaptune.search.cli import main
from adaptune.search.describe import asha_rungs
from adaptune.search.experiment import parse_experiment
from adaptune.search.tuner import build_scheduler
from conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
FILE = "exp.yaml"

GOOD = tiny_experiment(
    "bad-input",
    run={
        "stream": {
            "max_eval_blocks": 2,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "names", "builtin": "unicode_names"},
            ],
        },
    },
    search={"num_samples": 2, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
)

Mutation = Callable[[dict[str, Any], Path], None]


def put(path: str, value: Any) -> Mutation:
    """Set a dotted path (list indices as numbers) in the good experiment."""

    def fn(data: dict[str, Any], _: Path) -> None:
        *head, last = path.split(".")
        node: Any = data
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return fn


def puts(**changes: Any) -> Mutation:
    """Several :func:`put`, keyed by the dotted path with ``__`` for the dots."""

    def fn(data: dict[str, Any], tmp: Path) -> None:
        for path, value in changes.items():
            put(path.replace("__", "."), value)(data, tmp)

    return fn


def task_file(name: str, text: str, **domain: Any) -> Mutation:
    """Write ``name`` beside the experiment and make it the second task's source."""

    def fn(data: dict[str, Any], tmp: Path) -> None:
        (tmp / name).write_text(text)
        data["run"]["stream"]["tasks"][1] = {
            "name": "local", "source": "files", "files": [name], **domain
        }

    return fn


ROWS = "\n".join(json.dumps({"body": f"row {i} " * 20, "id": i}) for i in range(40))

# (id, the file: YAML text or a change to GOOD, substrings of the one line after "FILE: ")
CASES: list[tuple[str, str | Mutation, list[str]]] = [
    # --- the YAML itself
    ("yaml syntax", "name: x\nrun: [unclosed\n", ["invalid YAML: line 3, column 1"]),
    ("yaml duplicate key", "name: x\nname: y\n", ["line 2, column 1: duplicate key 'name'"]),
    ("yaml top-level list", "- name: x\n", ["must hold a YAML mapping (got list)"]),
    ("yaml empty file", "", ["must hold a YAML mapping (got NoneType)"]),
    # --- unknown keys, each listing the valid ones
    ("unknown top-level key", put("serach", {}),
     ["serach: unknown key (did you mean 'search'?)",
      "valid keys: name, run, space, search, resources, tracking"]),
    ("unknown run key", put("run.lr", 0.1), ["run.lr: unknown key", "valid keys: seed, model"]),
    ("unknown optim key", put("run.optim.momentum", 0.9),
     ["run.optim.momentum: unknown key", "lr, batch_size, epochs"]),
    ("unknown component", put("run.components.lwf", {}),
     ["run.components.lwf: unknown key", "valid keys: replay, ewc, distill"]),
    ("unknown search key", put("search.samples", 4),
     ["search.samples: unknown key (did you mean 'num_samples'?)", "max_failures"]),
    ("unknown resources key", put("resources.gpus", 1),
     ["resources.gpus: unknown key", "valid keys: cpus_per_trial, gpus_per_trial"]),
    ("unknown tracking key", put("tracking.uri", "sqlite:///x.db"),
     ["tracking.uri: unknown key", "tracking_uri, experiment_name, registered_model_name"]),
    # --- types
    ("lr is a string", put("run.optim.lr", "fast"),
     ["run.optim.lr:", "valid number", "'fast'"]),
    ("batch_size is a list", put("run.optim.batch_size", [8, 16]),
     ["run.optim.batch_size:", "valid integer (got a list)"]),
    ("num_samples is a float", put("search.num_samples", 2.5),
     ["search.num_samples:", "valid integer", "2.5"]),
    # --- ranges
    ("lr zero", put("run.optim.lr", 0), ["run.optim.lr:", "greater than 0", "(got 0)"]),
    ("batch_size zero", put("run.optim.batch_size", 0),
     ["run.optim.batch_size:", "greater than or equal to 1", "(got 0)"]),
    ("replay_fraction one", put("run.components.replay.replay_fraction", 1.0),
     ["run.components.replay.replay_fraction:", "less than 1", "(got 1.0)"]),
    ("negative ewc_lambda", put("run.components.ewc.ewc_lambda", -1.0),
     ["run.components.ewc.ewc_lambda:", "greater than or equal to 0", "(got -1.0)"]),
    ("temperature zero", put("run.components.distill.temperature", 0),
     ["run.components.distill.temperature:", "greater than 0"]),
    ("reduction_factor one", put("search.reduction_factor", 1),
     ["search.reduction_factor:", "greater than 1", "(got 1)"]),
    ("cpus_per_trial zero", put("resources.cpus_per_trial", 0),
     ["resources.cpus_per_trial:", "greater than 0"]),
    ("num_samples zero", put("search.num_samples", 0),
     ["search.num_samples:", "greater than or equal to 1"]),
    ("negative max_failures", put("search.max_failures", -1),
     ["search.max_failures:", "greater than or equal to 0", "(got -1)"]),
    ("unknown scheduler", put("search.scheduler", "hyperband"),
     ["search.scheduler:", "'asha'", "'fifo'", "'hyperband'"]),
    ("bad name", put("name", "my search"), ["name:", "pattern", "'my search'"]),
    # --- the space
    ("space: nothing searched", put("space", {"lr": 1.0e-3}),
     ["space: nothing to search", "loguniform, uniform, int, choice"]),
    ("space: empty", put("space", {}), ["space: nothing to search"]),
    ("space: unknown hyperparameter", put("space", {"learning_rate": {"uniform": [0, 1]}}),
     ["space:", "unknown hyperparameter 'learning_rate'", "valid keys: seed, lr"]),
    ("space: low >= high", put("space", {"replay_fraction": {"uniform": [0.5, 0.2]}}),
     ["space:", "replay_fraction", "`low < high`", "low=0.5, high=0.2"]),
    ("space: loguniform low <= 0", put("space", {"lr": {"loguniform": [0.0, 1.0e-2]}}),
     ["space:", "lr", "`low > 0`", "low=0.0"]),
    ("space: unknown distribution", put("space", {"lr": {"normal": [0, 1]}}),
     ["space:", "lr.normal", "valid values: loguniform, uniform, int, choice"]),
    ("space: empty choice", put("space", {"ewc_mode": {"choice": []}}),
     ["space:", "ewc_mode.choice", "at least 1"]),
    ("space: bound outside the run's range", put("space", {"lr": {"loguniform": [1e-4, 3.0]}}),
     ["space.lr: the value 3.0 is out of range", "run.optim.lr:", "less than or equal to 1"]),
    ("space: choice outside the run's range",
     put("space", {"replay_fraction": {"choice": [0.1, 1.5]}}),
     ["space.replay_fraction: the value 1.5 is out of range", "less than 1"]),
    ("space: searched and scheduled", put("run.schedule", {"lr": [1e-3, 5e-4]}),
     ["space.lr: searched, but run.schedule.lr also sets it",
      "replaces the searched one at every task, so the search would vary nothing",
      "drop space.lr", "or run.schedule.lr"]),
    # --- the objective and the scheduler
    ("objective forgetting", put("search.metric", "forgetting"),
     ["search.metric: 'forgetting' is not an objective", "it is 0 after task 1",
      "valid values: stream_loss"]),
    ("objective typo", put("search.metric", "stream_los"),
     ["search.metric: 'stream_los' is not an objective", "did you mean 'stream_loss'?",
      "valid values: stream_loss, seen_loss", "loss/docs"]),
    ("objective of a task not in the stream", put("search.metric", "loss/code"),
     ["search.metric: 'loss/code'", "loss/names"]),
    ("mode against the objective", puts(search__metric="bwt", search__mode="min"),
     ["search.mode: bwt is better when higher, so mode must be 'max' (got 'min'",
      "leave it out"]),
    ("mode against a task's loss", puts(search__metric="loss/names", search__mode="max"),
     ["search.mode: loss/names is better when lower, so mode must be 'min' (got 'max'"]),
    ("grace_period beyond the stream", put("search.grace_period", 3),
     ["search.grace_period:", "<= the number of tasks (2)", "(got 3)"]),
    # --- data
    ("missing file", task_file("other.txt", "x", files=["nope.txt"]),
     ["run.stream.tasks.1.files:", "file not found: ", "/nope.txt"]),
    ("missing column", task_file("rows.jsonl", ROWS),
     ["run.stream.tasks.1.text_field:", "column 'text' is not in the data",
      "valid values: body, id"]),
    ("unsupported extension", task_file("notes.xml", "<a>text</a>", files=["notes.xml"]),
     ["run.stream.tasks.1.files:", "supported extension", "valid values: .txt, .jsonl"]),
    ("unknown builtin domain", put("run.stream.tasks.1.builtin", "wikipedia"),
     ["run.stream.tasks.1.builtin:", "'python_docs'", "'unicode_names'", "'wikipedia'"]),
    ("duplicate task names", put("run.stream.tasks.1.name", "docs"),
     ["run.stream:", "task names must be unique", "['docs']"]),
    ("no tasks", put("run.stream.tasks", []), ["run.stream.tasks:", "at least 1"]),
    # --- model and tokenizer
    ("model that cannot load", put("run.model", {"name": "./no-such-model"}),
     ["run.model.name: cannot load causal LM './no-such-model'", "valid values: 'tiny-gpt'"]),
    ("tokenizer that cannot load", put("run.model.tokenizer", "./no-such-tokenizer"),
     ["run.model.tokenizer: cannot load tokenizer './no-such-tokenizer'", "valid values:"]),
    ("block_size beyond the context", put("run.stream.block_size", 128),
     ["run.stream.block_size: must be <= run.model.n_positions (64)", "(got 128)"]),
    ("n_embd not divisible by n_head", put("run.model.n_head", 3),
     ["run.model:", "n_embd % n_head == 0", "n_head=3"]),
]
SUBPROCESS = {"yaml syntax", "unknown search key", "objective forgetting", "missing column"}


def write_case(tmp: Path, content: str | Mutation) -> Path:
    path = tmp / FILE
    if isinstance(content, str):
        path.write_text(content)
    else:
        data = copy.deepcopy(GOOD)
        content(data, tmp)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "adaptune.search.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_the_table_is_distinct_and_large_enough() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_the_good_experiment_passes_the_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / FILE).write_text(yaml.safe_dump(GOOD))
    assert main(["search", FILE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  lr +loguniform \[0\.0001, 0\.01\]$", out, re.MULTILINE), out
    assert "scheduler:  asha (max_t 2 tasks, grace_period 1, reduction_factor 2): rungs after " \
           "task 1" in out
    assert "trials:     2 (2 at once)" in out
    assert "resources:  1 CPU, 0 GPU per trial" in out
    assert f"optuna:     sqlite:///{tmp_path}/runs/ray/bad-input/optuna.db" in out
    assert f"mlflow:     sqlite:///{tmp_path}/runs/mlflow.db" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE]  # nothing written
    assert not ray.is_initialized()  # nothing started


@pytest.mark.parametrize(
    ("search", "objective"),
    [
        ({}, "stream_loss (min)"),
        ({"metric": "bwt"}, "bwt (max)"),  # no mode: the metric's direction
        ({"metric": "bwt", "mode": "max"}, "bwt (max)"),  # a mode that agrees
        ({"metric": "loss/names"}, "loss/names (min)"),
    ],
)
def test_search_mode_is_the_metrics_direction(
    search: dict[str, str],
    objective: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    data = copy.deepcopy(GOOD)
    data["search"] |= search
    (tmp_path / FILE).write_text(yaml.safe_dump(data))
    assert main(["search", FILE, "--dry-run"]) == 0
    assert f"objective:  {objective}\n" in capsys.readouterr().out
    assert parse_experiment(data).search.mode == objective[-4:-1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [c[1:] for c in CASES if c[0] not in SUBPROCESS],
    ids=[c[0] for c in CASES if c[0] not in SUBPROCESS],
)
def test_bad_experiment_file(
    content: str | Mutation,
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    write_case(tmp_path, content)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["search", FILE]) == 2
    _check_message(capsys.readouterr().err, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no mlflow.db


@pytest.mark.parametrize("label", sorted(SUBPROCESS))
def test_bad_experiment_file_through_the_console_script(label: str, tmp_path: Path) -> None:
    content, expected = next(c[1:] for c in CASES if c[0] == label)
    write_case(tmp_path, content)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli("search", FILE, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    _check_message(proc.stderr, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _check_message(err: str, expected: list[str]) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"adaptune: error: {FILE}: "), line
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


def test_missing_experiment_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["search", FILE]) == 2
    _check_message(capsys.readouterr().err, ["experiment file not found"])
    assert not list(tmp_path.iterdir())


def test_dry_run_refuses_a_bad_file_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_case(tmp_path, put("search.metric", "forgetting"))
    assert main(["search", FILE, "--dry-run"]) == 2
    _check_message(capsys.readouterr().err, ["search.metric: 'forgetting'"])
    assert not (tmp_path / "runs").exists()


def test_max_failures_flag_is_validated_like_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / FILE).write_text(yaml.safe_dump(GOOD))
    assert main(["search", FILE, "--max-failures", "-1", "--dry-run"]) == 2
    _check_message(capsys.readouterr().err, ["search.max_failures:", "(got -1)"])
    assert main(["search", FILE, "--max-failures", "3", "--dry-run"]) == 0
    assert "retries per failed trial 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("grace", "rf", "max_t"),
    [(1, 2, 2), (1, 2, 3), (1, 2, 4), (1, 2, 8), (2, 2, 8), (1, 3, 10), (1, 1.5, 5), (3, 2, 3)],
)
def test_asha_rungs_match_rays_bracket(grace: int, rf: float, max_t: int) -> None:
    data = copy.deepcopy(GOOD)
    data["run"]["stream"]["tasks"] = [
        {"name": f"t{i}", "builtin": "python_docs"} for i in range(max_t)
    ]
    data["search"] |= {"grace_period": grace, "reduction_factor": rf}
    bracket = build_scheduler(parse_experiment(data))._brackets[0]  # Ray's own milestones
    expected = sorted({-(-m // 1) for m, _ in bracket._rungs if -(-m // 1) < max_t})
    assert asha_rungs(grace, rf, max_t) == [int(m) for m in expected]
