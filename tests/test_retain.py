"""Retain domains: evaluated before the first task and after every task, never trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from adaptune.search.cli import format_matrix, main
from adaptune.search.records import extra_columns, loss_matrix_figure, matrix_record
from adaptune.trainables import parse_run_config, prepare, run_stream
from adaptune.trainables.checkpoint import load_progress
from adaptune.trainables.metrics import direction, objectives, retain_metrics
from adaptune.trainables.run import Prepared
from conftest import tiny_experiment, write_experiment

TASKS = [{"name": "docs", "builtin": "python_docs"}, {"name": "code", "builtin": "python_source"}]
RETAIN = [{"name": "unicode", "builtin": "unicode_names"}]


def experiment(name: str = "ret", **run: Any) -> dict[str, Any]:
    """Two tasks and one retain domain at test size (a 1-layer GPT, 1024 tokens per task)."""
    return tiny_experiment(
        name, run={"seed": 0, "stream": {"tasks": TASKS, "retain": RETAIN}, **run}
    )


def collect(prep: Prepared, **kwargs: Any) -> tuple[list[dict[str, Any]], Any]:
    reports: list[dict[str, Any]] = []
    progress = run_stream(prep, report=lambda m, _ckpt: reports.append(m), **kwargs)
    return reports, progress


@pytest.fixture(scope="module")
def with_and_without() -> tuple[Prepared, list[dict[str, Any]], Any, list[dict[str, Any]]]:
    """The same run (same seed) with the retain domain and without it."""
    prep = prepare(parse_run_config(experiment()["run"]))
    reports, progress = collect(prep)
    plain = experiment()["run"]
    plain["stream"]["retain"] = []
    without, _ = collect(prepare(parse_run_config(plain)))
    return prep, reports, progress, without


def test_retain_metrics_from_a_hand_computed_matrix() -> None:
    R = [[2.0, 4.0], [2.5, 4.5], [3.5, 4.5]]  # rows: before, after task 1, after task 2
    got = retain_metrics(R, 2, ["wiki", "news"])
    assert got["retain_loss"] == pytest.approx(4.0)
    assert got["retain_forgetting"] == pytest.approx(4.0 - 3.0)
    assert got["retain/wiki"] == 3.5 and got["retain/news"] == 4.5
    assert got["retain_ppl"] == pytest.approx(54.598150, rel=1e-6)  # exp(4)
    assert retain_metrics(R, 0, ["wiki", "news"])["retain_forgetting"] == 0.0
    assert retain_metrics([[1.0]], 0, []) == {}
    with pytest.raises(ValueError, match="one column per name"):
        retain_metrics(R, 3, ["wiki", "news"])


def test_retain_metrics_are_objectives_only_with_retain_domains() -> None:
    got = objectives(["docs"], pretrain=False, retain_names=["wiki"])
    assert {"retain_loss", "retain_forgetting", "retain_ppl", "retain/wiki"} <= set(got)
    assert all(got[m] == "min" for m in ("retain_loss", "retain_forgetting", "retain/wiki"))
    assert all(direction(m) == d for m, d in got.items())
    assert not any(m.startswith("retain") for m in objectives(["docs"], pretrain=False))


def test_every_task_reports_the_retain_metrics_of_its_row(with_and_without: Any) -> None:
    prep, reports, progress, _ = with_and_without
    R = progress.retain_losses
    assert len(R) == 3 and all(len(row) == 1 for row in R)  # before, after docs, after code
    assert [m["task_index"] for m in reports] == [1, 2]
    for m in reports:
        k = m["task_index"]
        assert m["retain/unicode"] == R[k][0]
        assert m["retain_loss"] == pytest.approx(R[k][0])
        assert m["retain_forgetting"] == pytest.approx(R[k][0] - R[0][0])
        assert m["retain_matrix"] == R[: k + 1]
        assert "loss/unicode" not in m  # a retain domain is no task
    assert reports[0]["retain_forgetting"] != reports[1]["retain_forgetting"]


def test_a_retain_domain_is_never_trained_on(with_and_without: Any) -> None:
    prep, reports, _, without = with_and_without
    assert prep.retain[0].train.shape[0] == 0 and prep.retain[0].eval.shape[0] == 4
    for a, b in zip(reports, without, strict=True):
        assert a["train_tokens"] == b["train_tokens"]
        assert a["loss_matrix"] == b["loss_matrix"]  # task columns untouched, bit for bit
        assert a["train_loss"] == b["train_loss"]
    assert not any(k.startswith("retain") for k in without[-1])


def test_retain_losses_resume_exactly(with_and_without: Any, tmp_path: Path) -> None:
    prep, full, _, _ = with_and_without
    saved = tmp_path / "after-task-1"
    run_stream(prep, report=lambda _m, ckpt: shutil.copytree(ckpt, saved), stop_after=1)
    assert len(load_progress(saved).retain_losses) == 2
    resumed, progress = collect(prep, resume_from=saved)
    assert [m["task_index"] for m in resumed] == [2]
    for key in ("retain_loss", "retain_forgetting", "retain/unicode", "stream_loss"):
        assert resumed[0][key] == pytest.approx(full[1][key], abs=1e-4), key
    assert len(progress.retain_losses) == 3


def test_a_progress_file_without_retain_losses_still_loads(tmp_path: Path) -> None:
    old = {"tasks_done": 1, "loss_matrix": [[5.0], [4.0]], "base_losses": [],
           "trained_tokens": 64, "config": {}}
    (tmp_path / "progress.json").write_text(json.dumps(old))
    assert load_progress(tmp_path).retain_losses == []


def test_the_matrix_shows_retain_columns_apart_from_the_tasks() -> None:
    record = matrix_record(
        ["docs", "code"], [[5.0, 6.0], [4.0, 5.5], [4.5, 4.0]], base=[],
        retain=["wiki"], retain_matrix=[[3.0], [3.25], [3.5]],
    )
    assert extra_columns(record) == {"retain/wiki": [3.0, 3.25, 3.5]}
    lines = format_matrix(record["loss_matrix"], ["docs", "code"], None, extra_columns(record))
    head, *rows = lines.splitlines()
    assert head.split() == ["docs", "code", "retain/wiki"]
    assert rows[2].split() == ["after", "code", "4.5000", "4.0000", "3.5000"]
    fig = loss_matrix_figure(record["loss_matrix"], record["tasks"], extra_columns(record))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["docs", "code", "retain/wiki"]
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [1.5]  # between tasks and retain
    assert "retain" not in matrix_record(["docs"], [[1.0]], retain=[])


def test_train_prints_and_saves_the_retain_columns_of_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "exp"
    folder.mkdir()
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(80)]
    (folder / "general.txt").write_text("\n\n".join(paragraphs))
    data = experiment("ret-cli")
    data["run"]["stream"]["retain"] = [{"name": "general", "files": ["general.txt"]}]
    exp = write_experiment(folder / "ret.yaml", data)
    monkeypatch.chdir(tmp_path)  # the relative file resolves against the experiment's folder
    assert main(["train", str(exp), "--out", str(tmp_path / "out"), "--no-tracking"]) == 0
    out = capsys.readouterr().out
    head = out[out.index("loss matrix"):].splitlines()[1]
    assert head.split() == ["docs", "code", "retain/general"]
    saved = json.loads((tmp_path / "out/loss_matrix.json").read_text())
    assert saved["retain"] == ["general"]
    assert len(saved["retain_matrix"]) == len(saved["loss_matrix"]) == 3
    last = json.loads((tmp_path / "out/metrics.jsonl").read_text().splitlines()[-1])
    assert last["retain/general"] == saved["retain_matrix"][-1][0]
    assert "retain_matrix" not in last


def test_search_dry_run_accepts_retain_loss_as_the_objective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "x.yaml", tiny_experiment(
        "x", run={"stream": {"retain": RETAIN, "tasks": TASKS}},
        search={"metric": "retain_loss"},
    ))
    assert main(["search", "x.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "objective:  retain_loss (min)" in out
    assert "retain:     1" in out and "unicode" in out


def test_retain_loss_without_retain_domains_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "x.yaml", tiny_experiment("x", search={"metric": "retain_loss"}))
    assert main(["search", "x.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search.metric" in err and "'retain_loss'" in err


BAD = [
    (
        "name taken by a task",
        [{"name": "docs", "builtin": "unicode_names"}],
        "run.stream",
        "unique across tasks and retain",
    ),
    (
        "missing file",
        [{"name": "wiki", "files": ["nope.txt"]}],
        "run.stream.retain.0.files",
        "not found",
    ),
]


@pytest.mark.parametrize(("label", "retain", "field", "rule"), BAD, ids=[b[0] for b in BAD])
def test_bad_retain_domains_exit_2_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    label: str,
    retain: list[dict[str, Any]],
    field: str,
    rule: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    data = experiment("bad")
    data["run"]["stream"]["retain"] = retain
    write_experiment(tmp_path / "bad.yaml", data)
    assert main(["train", "bad.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert field in err and rule in err, err
    assert not (tmp_path / "runs").exists()
