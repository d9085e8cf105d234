"""A real search through the command line: Ray Tune + Optuna + ASHA + MLflow, a tiny model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from adaptune.search.checks import check_search
from adaptune.search.cli import main
from adaptune.search.experiment import parse_experiment
from adaptune.search.tags import PARENT_TAG, TRIAL_TAG
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

EXPERIMENT = tiny_experiment(
    "e2e",
    run={"stream": {"max_train_tokens": 4096}},
    # lr over five decades: lr near 1e-6 leaves the model where it started, so ASHA stops it
    space={"lr": {"loguniform": [1.0e-6, 2.0e-2]}, "buffer_size": {"choice": [0, 32]}},
    search={
        "num_samples": 6,
        "seed": 3,
        "scheduler": "asha",
        "grace_period": 1,
        "reduction_factor": 2,
    },
)


@pytest.mark.slow
def test_search_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, shared_ray: None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_experiment(tmp_path / "e2e.yaml", EXPERIMENT)

    assert main(["search", "e2e.yaml"]) == 0
    out = capsys.readouterr().out
    assert "champion: models:/adaptune-e2e@champion" in out
    # the summary table ends with what each trial cost; no gpu_mb column without CUDA
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "trial"])
    assert lines[head].split()[-2:] == ["params", "rss_mb"]
    trainable, total = lines[head + 1].split()[-2].split("/")
    assert trainable == total and float(lines[head + 1].split()[-1]) > 50

    # Optuna: the study persists beside the Ray results; stopped trials are PRUNED
    study = optuna.load_study(
        study_name="e2e", storage=f"sqlite:///{tmp_path / 'runs' / 'ray' / 'e2e' / 'optuna.db'}"
    )
    states = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert len(states) == 6
    pruned = [i for i, t in states.items() if t.state == optuna.trial.TrialState.PRUNED]
    complete = [i for i, t in states.items() if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned, "ASHA stopped no trial"
    assert complete
    for trial_id in pruned:
        steps = sorted(states[trial_id].intermediate_values)
        assert steps and steps[-1] < 3  # stopped before the last task
    for trial_id in complete:
        assert sorted(states[trial_id].intermediate_values) == [1, 2, 3]

    # MLflow: one parent, each trial exactly once under it, ASHA's stops are KILLED
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert {r.data.tags[PARENT_TAG] for r in children} == {parents[0].info.run_id}
    ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert sorted(ids) == sorted(states) and len(set(ids)) == len(ids)
    status = {r.data.tags[TRIAL_TAG]: r.info.status for r in children}
    assert all(status[i] == "KILLED" for i in pruned)
    assert all(status[i] == "FINISHED" for i in complete)
    assert all(r.data.metrics["params_trainable"] > 0 for r in children)
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    expected = {"experiment.yaml", "trials.csv", "trials.md", "objective_per_trial.png"}
    assert expected <= parent_artifacts

    # the champion resolves through the registry alias, loads and generates
    version = client.get_model_version_by_alias("adaptune-e2e", "champion")
    assert version.tags["adaptune.trial_id"] in complete
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    pipe = mlflow.transformers.load_model("models:/adaptune-e2e@champion")
    text = pipe("def ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("def ") and len(text) > 4


def _exp(**changes: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(EXPERIMENT))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search__metric": "forgetting"}, "is not an objective the trainable reports (it is 0"),
        ({"search__metric": "train_loss"}, "valid values: stream_loss, seen_loss"),
        ({"search__metric": "loss/nope"}, "'loss/nope' is not an objective"),
        ({"search__metric": "bwt", "search__mode": "min"},
         "search.mode: bwt is better when higher, so mode must be 'max' (got 'min'"),
        ({"search__grace_period": 4}, "search.grace_period: must be <= the number of tasks (3)"),
        ({"space": {"lr": 1e-3}}, "space: nothing to search"),
        ({"space": {"lr": {"loguniform": [1e-4, 3.0]}}}, "space.lr: the value 3.0 is out of range"),
    ],
)
def test_check_search_refuses(changes: dict, message: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(_exp(**changes))
    with pytest.raises(ConfigError) as err:
        check_search(exp)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_check_search_accepts_per_task_losses_and_max_objectives(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_search(parse_experiment(_exp(search__metric="loss/code")))
    check_search(parse_experiment(_exp(search__metric="bwt", search__mode="max")))
    check_search(parse_experiment(_exp(search__metric="bwt")))  # mode taken from the metric


def test_cli_search_refuses_before_writing_anything(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(_exp(search__metric="forgetting")))
    assert main(["search", "bad.yaml"]) == 2
    assert "search.metric" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(_exp(run__stream__tasks=[{"name": "x", "source": "files",
                                                  "files": ["missing.txt"]}]))
    )
    assert main(["search", "bad.yaml"]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no runs/, no mlflow.db


def test_cli_search_refuses_an_existing_search_name(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "e2e.yaml", EXPERIMENT)
    (tmp_path / "runs" / "ray" / "e2e").mkdir(parents=True)
    (tmp_path / "runs" / "ray" / "e2e" / "tuner.pkl").write_text("")
    assert main(["search", "e2e.yaml"]) == 2
    assert "pass --name NEW_NAME" in capsys.readouterr().err
