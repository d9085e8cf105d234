"""What a real search records per trial in MLflow: every hyperparameter, settings as tags, run
names that tell trials apart, and the champion's version linked to its trial's run."""

from __future__ import annotations

import re

import pytest
from adaptune.search.cli import main
from adaptune.search.tags import (
    CHAMPION_RUN_TAG,
    CHAMPION_TAG,
    CUDA_TAG,
    PARENT_TAG,
    SEARCHED_TAG,
    THREADS_TAG,
    TRIAL_TAG,
)
from adaptune.trainables.config import HYPERPARAMETERS
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

EXPERIMENT = tiny_experiment(
    "records",
    run={"components": {"ewc": {"ewc_lambda": 5.0}}},  # a fixed value that is not a default
    space={"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "temperature": 3.0},  # one fixed entry
    search={"num_samples": 2, "max_concurrent": 2},
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, shared_ray: None) -> MlflowClient:
    tmp = tmp_path_factory.mktemp("records")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("HF_HUB_OFFLINE", "1")
        write_experiment(tmp / "records.yaml", EXPERIMENT)
        assert main(["search", "records.yaml"]) == 0
    return MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")


def _runs(client: MlflowClient) -> tuple[object, list[object]]:
    experiment = client.get_experiment_by_name("records")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    return parent, [r for r in runs if PARENT_TAG in r.data.tags]


@pytest.mark.slow
def test_trial_runs_hold_every_hyperparameter_and_settings_as_tags(store: MlflowClient) -> None:
    parent, children = _runs(store)
    assert len(children) == 2
    assert parent.data.tags[SEARCHED_TAG] == "lr"
    for run in children:
        params = run.data.params
        # the champion's run also holds its logged model's inference config (MLflow's own)
        extra = {"handle_long_generation"} if run.outputs.model_outputs else set()
        expected = set(HYPERPARAMETERS) | extra
        assert set(params) == expected, sorted(expected ^ set(params))
        assert params["ewc_lambda"] == "5.0" and params["temperature"] == "3.0"  # fixed
        assert params["batch_size"] == "8" and params["buffer_size"] == "0"  # fixed, defaults
        assert 1e-4 <= float(params["lr"]) <= 1e-2  # searched
        metrics = run.data.metrics
        assert "threads" not in metrics and "cuda" not in metrics and "pid" not in metrics
        assert "stream_loss" in metrics
        assert int(run.data.tags[THREADS_TAG]) >= 1 and run.data.tags[CUDA_TAG] == "0"


@pytest.mark.slow
def test_trial_run_names_start_with_what_tells_them_apart(store: MlflowClient) -> None:
    _, children = _runs(store)
    names = sorted(r.info.run_name for r in children)
    for number, run in enumerate(sorted(children, key=lambda r: r.info.run_name), start=1):
        trial_id = run.data.tags[TRIAL_TAG]
        assert run.info.run_name == f"t{number:02d}-{trial_id}", names
        assert re.fullmatch(r"t\d{2}-[0-9a-f]{8}", run.info.run_name)


@pytest.mark.slow
def test_champion_version_links_the_trial_run_and_the_parent_tags_it(store: MlflowClient) -> None:
    parent, children = _runs(store)
    version = store.get_model_version_by_alias("adaptune-records", "champion")
    run = next(r for r in children if r.info.run_id == version.run_id)
    assert run.data.tags[TRIAL_TAG] == version.tags[TRIAL_TAG] == parent.data.tags[CHAMPION_TAG]
    assert parent.data.tags[CHAMPION_RUN_TAG] == run.info.run_id
    assert run.info.status == "FINISHED"
    assert any(o.model_id for o in run.outputs.model_outputs)
