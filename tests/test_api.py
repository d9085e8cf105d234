"""The Python API (``adaptune.search.train`` / ``search``) and the MLflow record of a train run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from adaptune.search import api
from adaptune.search.cli import main
from adaptune.search.experiment import parse_experiment
from adaptune.search.tags import KIND_SEARCH, KIND_TAG, KIND_TRAIN, TASKS_DONE_TAG
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path: Path, name: str = "api", **changes: object) -> dict:
    data = tiny_experiment(name, **changes)
    data["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    return data


def _runs(tmp_path: Path, experiment_name: str) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment_name)
    return list(client.search_runs([found.experiment_id])) if found else []


def test_the_readme_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "README: no python block under '## From Python'"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "quickstart.yaml", tmp_path / "experiments")
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert isinstance(result, api.RunResult)
    # quiet=True: the only output is the example's own print
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 1, out.out
    assert "INFO" not in out.err, out.err
    assert len(result.loss_matrix) == 4 and result.tasks == ["docs", "code", "unicode"]
    assert result.metrics["task_index"] == 3
    assert [m["task_index"] for m in result.task_metrics] == [1, 2, 3]
    assert result.checkpoint_dir is not None
    assert (result.checkpoint_dir / "model" / "model.safetensors").is_file()
    assert result.checkpoint_dir.parent.parent == tmp_path / "runs" / "train" / "py"

    # the quickstart's own store: runs/mlflow.db, MLflow experiment "quickstart"
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.data.tags[KIND_TAG] == KIND_TRAIN and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "quickstart"
    assert run.data.params["lr"] == "0.002" and run.data.params["buffer_size"] == "0"
    history = client.get_metric_history(result.run_id, "stream_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert history[-1].value == pytest.approx(result.metrics["stream_loss"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"loss_matrix.json", "loss_matrix.png", "experiment.yaml"} <= artifacts


def test_cli_train_logs_a_standalone_run_unless_no_tracking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = write_experiment(tmp_path / "x.yaml", _tiny(tmp_path, "cli-train"))
    assert main(["train", str(exp), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "loss matrix (nats/token" in out and "after unicode" in out
    (run,) = _runs(tmp_path, "cli-train")
    assert run.data.tags[KIND_TAG] == KIND_TRAIN
    assert "mlflow.parentRunId" not in run.data.tags
    assert f"(run {run.info.run_id})" in out
    assert set(run.data.params) >= {"lr", "ewc_lambda", "distill_alpha", "model", "tasks"}
    assert run.data.metrics["task_index"] == 3 and "loss/docs" in run.data.metrics

    assert main(["train", str(exp), "--out", str(tmp_path / "b"), "--no-tracking"]) == 0
    assert "mlflow:" not in capsys.readouterr().out
    assert len(_runs(tmp_path, "cli-train")) == 1


def test_stop_and_resume_continue_one_mlflow_run(tmp_path: Path) -> None:
    exp = parse_experiment(_tiny(tmp_path, "resumed"))
    first = api.train(exp, out=tmp_path / "o", stop_after=1, quiet=True)
    assert len(first.loss_matrix) == 2 and first.metrics["task_index"] == 1
    (run,) = _runs(tmp_path, "resumed")
    assert run.info.status == "KILLED" and run.data.tags[TASKS_DONE_TAG] == "1"
    second = api.train(exp, out=tmp_path / "o", resume=True, quiet=True)
    assert second.run_id == first.run_id
    assert [m["task_index"] for m in second.task_metrics] == [1, 2, 3]
    (run,) = _runs(tmp_path, "resumed")
    assert run.info.status == "FINISHED" and run.data.tags[TASKS_DONE_TAG] == "3"


def test_overrides_as_dict_or_list_and_bad_ones_are_config_errors(tmp_path: Path) -> None:
    exp = parse_experiment(_tiny(tmp_path, "ovr"))
    changed, source = api.resolve_experiment(
        exp, {"lr": 3e-4, "run.stream.block_size": 16, "name": "other"}
    )
    assert source is None
    assert changed.run.optim.lr == 3e-4 and changed.run.stream.block_size == 16
    assert changed.name == "other"
    path = write_experiment(tmp_path / "x.yaml", _tiny(tmp_path, "ovr"))
    listed, source = api.resolve_experiment(path, ["buffer_size=8"])
    assert listed.run.components.replay.buffer_size == 8 and source == str(path)
    with pytest.raises(ConfigError, match=r"run\.optim\.lr"):
        api.train(path, overrides={"lr": -1.0}, tracking=False, quiet=True)
    with pytest.raises(ConfigError, match="overrides: must be a list"):
        api.train(path, overrides="lr=1e-3", tracking=False, quiet=True)  # type: ignore[arg-type]
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


def test_importing_the_package_does_not_load_the_api() -> None:
    code = (
        "import sys, adaptune.search as s; print('adaptune.search.api' in sys.modules); "
        "from adaptune.search import train, search, RunResult; "
        "print(train is s.api.train, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.split() == ["False", "True", "False"]
    with pytest.raises(AttributeError):
        import adaptune.search

        adaptune.search.no_such_name  # noqa: B018


@pytest.mark.slow
def test_search_quiet_returns_the_trials_champion_and_result_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _tiny(
        tmp_path,
        "api-search",
        run={"stream": {"tasks": [{"name": "docs", "builtin": "python_docs"},
                                  {"name": "unicode", "builtin": "unicode_names"}]}},
        search={"num_samples": 2},
    )
    path = write_experiment(tmp_path / "s.yaml", data)
    result = api.search(path, overrides={"search.max_concurrent": 2}, quiet=True)
    out = capfd.readouterr()
    assert "Trial status" not in out.out + out.err and "adaptune search" not in out.out
    assert out.out.strip() == "", out.out
    assert "Started a local Ray instance" not in out.err and "A new study" not in out.err
    assert len(result.rows) == 2 and not result.interrupted
    assert set(result.rows[0]) >= {"trial_id", "stream_loss", "tasks_done", "status", "lr"}
    frame = result.to_pandas()
    assert list(frame["trial_id"]) == [r["trial_id"] for r in result.rows]
    assert len(result.result_grid) == 2 and not result.result_grid.errors
    assert result.model_uri == "models:/adaptune-api-search@champion"
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.parent_run_id).data.tags[KIND_TAG] == KIND_SEARCH
