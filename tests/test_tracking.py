"""The MLflow callback driven with fake trials: parent/child runs, params, steps, artifacts."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from adaptune.search.experiment import experiment_yaml, parse_experiment
from adaptune.search.records import experiment_hash
from adaptune.search.stores import existing_store, resolve_tracking_uri
from adaptune.search.tags import HASH_TAG, PARENT_TAG, TRIAL_TAG
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.spaces.tune import build_param_space
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment
from mlflow.tracking import MlflowClient

TASKS = ["docs", "code", "unicode"]


@dataclass
class FakeTrial:
    """The attributes the callback reads from a ``ray.tune.experiment.Trial``."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None

    def get_pickled_error(self) -> Exception | None:
        return self.error


def _experiment(db: Path, name: str) -> Any:
    return parse_experiment(
        tiny_experiment(
            name,
            run={"stream": {"tasks": [{"name": n, "builtin": "python_docs"} for n in TASKS]}},
            space={"buffer_size": {"int": [0, 64]}, "temperature": 3.0},
            tracking={"tracking_uri": f"sqlite:///{db}"},
        )
    )


def _config(exp: Any, lr: float, buffer_size: int) -> dict[str, Any]:
    config = build_param_space(exp)
    config["optim"]["lr"] = lr
    config["components"]["replay"]["buffer_size"] = buffer_size
    return config


def _result(k: int, loss: float) -> dict[str, Any]:
    matrix = [[5.0, 5.0, 5.0]] + [[loss + i, loss, loss + 1] for i in range(k)]
    return {
        "task_index": k,
        "training_iteration": k,
        "stream_loss": loss,
        "loss/docs": loss + 0.1,
        "train_tokens": 1000 * k,
        "loss_matrix": matrix,
        "hostname": "node",  # non-numeric: skipped
        "done": False,  # bool: skipped
        "config": {"seed": 0},  # nested: skipped
    }


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow database for the module (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlruns" / "mlflow.db"


@pytest.fixture()
def tracked(db: Path, request: pytest.FixtureRequest) -> tuple[Any, MlflowTrackingCallback]:
    exp = _experiment(db, request.node.name.removeprefix("test_")[:40])
    callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
    callback.setup()
    return exp, callback


def _drive(callback: MlflowTrackingCallback, trial: FakeTrial, losses: list[float]) -> None:
    callback.on_trial_start(0, [trial], trial)
    for k, loss in enumerate(losses, start=1):
        trial.last_result = _result(k, loss)
        callback.on_trial_result(0, [trial], trial, trial.last_result)


def test_relative_sqlite_uri_is_resolved_against_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///a/b/mlflow.db") == f"sqlite:///{tmp_path}/a/b/mlflow.db"
    assert (tmp_path / "a" / "b").is_dir()
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


def test_commands_that_read_a_store_refuse_a_missing_sqlite_file(
    tmp_path: Path, monkeypatch
) -> None:
    # `adaptune ui` and `adaptune export` share this check: MlflowClient would otherwise
    # create an empty store where the user mistyped a path.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^--tracking-uri: no MLflow store at .*runs/mlflow.db"):
        existing_store("sqlite:///runs/mlflow.db")
    assert not (tmp_path / "runs").exists()  # nothing created on the way
    MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db").search_experiments()  # a real store
    assert existing_store("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert existing_store("http://host:5000") == "http://host:5000"


def test_parent_run_tags_params_and_yaml(tracked, db: Path, tmp_path: Path) -> None:
    exp, callback = tracked
    client = MlflowClient(f"sqlite:///{db}")
    parent = client.get_run(callback.parent_run_id)
    text = experiment_yaml(exp)
    assert parent.data.tags[HASH_TAG] == experiment_hash(text)
    assert parent.data.params["search.metric"] == "stream_loss"
    assert parent.data.params["tasks"] == "docs,code,unicode"
    path = client.download_artifacts(callback.parent_run_id, "experiment.yaml", str(tmp_path))
    assert Path(path).read_text() == text
    assert (db.parent / "mlartifacts" / exp.name).is_dir()  # beside the database


def test_child_runs_params_metrics_artifacts_and_statuses(tracked, tmp_path: Path) -> None:
    exp, callback = tracked
    finished = FakeTrial("t_00000", _config(exp, 1e-3, 16))
    killed = FakeTrial("t_00001", _config(exp, 5e-3, 0))
    failed = FakeTrial("t_00002", _config(exp, 1e-2, 64), error=RuntimeError("boom\nmore"))

    _drive(callback, finished, [3.0, 2.5, 2.0])
    callback.on_trial_complete(0, [], finished)
    _drive(callback, killed, [4.0])
    callback.on_trial_complete(0, [], killed)  # ASHA stopped it after task 1
    _drive(callback, failed, [3.5])
    callback.on_trial_error(0, [], failed)
    callback.on_experiment_end([])

    client = callback.client
    runs = client.search_runs(
        [callback.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{callback.parent_run_id}'"
    )
    by_trial = {r.data.tags[TRIAL_TAG]: r for r in runs}
    assert sorted(by_trial) == ["t_00000", "t_00001", "t_00002"]
    assert {t: r.info.status for t, r in by_trial.items()} == {
        "t_00000": "FINISHED", "t_00001": "KILLED", "t_00002": "FAILED",
    }
    # the error's first line and the task after the last report (task 1 of 3 was reported)
    assert by_trial["t_00002"].data.tags["adaptune.error"] == (
        "RuntimeError: boom (during task 2/3 'code')"
    )

    run = by_trial["t_00000"]
    searched = {"lr": "0.001", "buffer_size": "16", "temperature": "3.0"}
    assert searched.items() <= run.data.params.items() and run.data.params["seed"] == "0"
    history = client.get_metric_history(run.info.run_id, "stream_loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/docs")] == [1, 2, 3]
    assert not {"hostname", "done", "loss_matrix", "config"} & set(run.data.metrics)

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"loss_matrix.json", "loss_matrix.png"}
    local = client.download_artifacts(run.info.run_id, "loss_matrix.json", str(tmp_path))
    data = json.loads(Path(local).read_text())
    assert data["tasks"] == TASKS and len(data["loss_matrix"]) == 4
    png = client.download_artifacts(run.info.run_id, "loss_matrix.png", str(tmp_path))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"


def test_one_child_per_trial_even_after_restart_and_resume(tracked) -> None:
    exp, callback = tracked
    trial = FakeTrial("t_00007", _config(exp, 1e-3, 8))
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_start(0, [trial], trial)  # restarted after a failure
    # a resumed search: the callback comes back from the Tuner's pickle with an empty cache
    resumed = pickle.loads(pickle.dumps(callback))
    resumed._children.clear()
    resumed.on_trial_start(0, [trial], trial)
    runs = callback.client.search_runs(
        [callback.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = 't_00007'"
    )
    assert len(runs) == 1
    assert resumed.child_run_id(trial) == runs[0].info.run_id


def test_trial_left_running_is_killed_at_experiment_end(tracked) -> None:
    exp, callback = tracked
    trial = FakeTrial("t_00009", _config(exp, 1e-3, 8))
    _drive(callback, trial, [3.0])
    callback.on_experiment_end([trial])
    assert callback.client.get_run(callback.child_run_id(trial)).info.status == "KILLED"
