"""ContinualOptunaSearch fed results directly: PRUNED / COMPLETE / FAIL reach the Optuna study."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
from adaptune.search.searcher import ContinualOptunaSearch, build_searcher
from ray import tune

T = 3  # tasks in the stream

PARAM_SPACE = {
    "seed": 0,
    "optim": {"lr": tune.loguniform(1e-4, 1e-2), "batch_size": 8},
    "components": {"replay": {"buffer_size": tune.randint(0, 65)}},
}


def _searcher(tmp_path: Path, algorithm: str = "tpe") -> ContinualOptunaSearch:
    searcher = build_searcher(
        study_name="demo",
        storage_file=tmp_path / "ray" / "demo" / "optuna.db",
        metric="stream_loss",
        mode="min",
        max_t=T,
        algorithm=algorithm,
        seed=1,
    )
    assert searcher.set_search_properties("stream_loss", "min", PARAM_SPACE)
    return searcher


def _result(task: int, loss: float) -> dict[str, float | int]:
    # what Tune passes: the flattened result with task_index == training_iteration
    return {"stream_loss": loss, "task_index": task, "training_iteration": task, "seen_loss": loss}


def _run(searcher: ContinualOptunaSearch, trial_id: str, losses: list[float]) -> dict:
    config = searcher.suggest(trial_id)
    # Tune's stopping result reaches only on_trial_complete, never on_trial_result
    for k, loss in enumerate(losses[:-1], start=1):
        searcher.on_trial_result(trial_id, _result(k, loss))
    searcher.on_trial_complete(trial_id, result=_result(len(losses), losses[-1]))
    return config


def test_suggest_returns_nested_config_and_optuna_uses_flat_names(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    config = searcher.suggest("t0")
    assert set(config) == {"optim", "components"}
    assert 1e-4 <= config["optim"]["lr"] <= 1e-2
    assert 0 <= config["components"]["replay"]["buffer_size"] <= 64  # inclusive high
    assert set(searcher.study.trials[0].distributions) == {"lr", "buffer_size"}


def test_states_pruned_complete_fail(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    _run(searcher, "stopped", [4.0])  # ASHA stopped it after task 1
    _run(searcher, "stopped2", [4.0, 3.9])  # ... after task 2
    _run(searcher, "finished", [3.0, 2.5, 2.0])
    searcher.suggest("crashed")
    searcher.on_trial_result("crashed", _result(1, 3.5))
    searcher.on_trial_complete("crashed", error=True)

    by_number = {t.number: t for t in searcher.study.trials}
    stopped, stopped2, finished, crashed = (by_number[i] for i in range(4))
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {1: 4.0}
    assert stopped2.state == optuna.trial.TrialState.PRUNED
    assert stopped2.intermediate_values == {1: 4.0, 2: 3.9}
    assert stopped2.value == 3.9  # Optuna keeps the last intermediate value
    assert finished.state == optuna.trial.TrialState.COMPLETE
    assert finished.value == 2.0
    assert finished.intermediate_values == {1: 3.0, 2: 2.5, 3: 2.0}
    assert crashed.state == optuna.trial.TrialState.FAIL
    assert crashed.intermediate_values == {1: 3.5}


def test_nan_final_value_is_not_complete(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    _run(searcher, "nan", [3.0, 2.5, float("nan")])
    (trial,) = searcher.study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.intermediate_values == {1: 3.0, 2: 2.5}


def test_duplicate_completion_and_repeated_step_are_ignored(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    searcher.suggest("t")
    searcher.on_trial_result("t", _result(1, 3.0))
    searcher.on_trial_result("t", _result(1, 9.0))  # a restored trial reports task 1 again
    searcher.on_trial_complete("t", result=_result(3, 2.0))
    searcher.on_trial_complete("t", error=True)
    (trial,) = searcher.study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.intermediate_values == {1: 3.0, 3: 2.0}


def test_study_persists_in_sqlite_and_searcher_pickles(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    _run(searcher, "a", [3.0, 2.0, 1.0])
    restored = pickle.loads(pickle.dumps(searcher))  # Tune checkpoints the searcher
    _run(restored, "b", [5.0])
    study = optuna.load_study(
        study_name="demo", storage=f"sqlite:///{tmp_path / 'ray' / 'demo' / 'optuna.db'}"
    )
    assert [t.state for t in study.trials] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    ]


def test_seeded_samplers_repeat(tmp_path: Path) -> None:
    for algorithm in ("tpe", "random"):
        a = _searcher(tmp_path / f"a-{algorithm}", algorithm).suggest("x")
        b = _searcher(tmp_path / f"b-{algorithm}", algorithm).suggest("x")
        assert a == b
    assert isinstance(_searcher(tmp_path / "r", "random").study.sampler,
                      optuna.samplers.RandomSampler)


def test_max_t_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_t >= 1"):
        ContinualOptunaSearch(max_t=0, metric="stream_loss", mode="min")
