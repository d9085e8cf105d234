"""Searches survive bad trials: errors, NaN losses and killed workers.

The end-to-end search runs the real stack (Ray Tune, Optuna, MLflow) with a trainable that wraps
``continual_trainable`` and injects faults by the trial's ``seed``: seed 2 raises, seed 3 kills
its worker once (after its second task's checkpoint), and ``ewc_lambda: 1e300`` overflows the
float32 EWC penalty at the first step of task 2 (a real TrainingDivergedError). The random
sampler's seed is chosen so five trials get exactly one of each fault and two clean trials.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import optuna
import pytest
from adaptune.search import tuner
from adaptune.search.cli import main
from adaptune.search.experiment import experiment_yaml, parse_experiment
from adaptune.search.tags import ERROR_TAG, FAILURES_TAG, PARENT_TAG, TRIAL_TAG
from adaptune.search.tracking import ERROR_ARTIFACT, MlflowTrackingCallback, describe_error
from adaptune.trainables.errors import TrainingDivergedError
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient
from ray.exceptions import RayTaskError

TASKS = ["docs", "names", "code"]
RAISES, KILLED = 2, 3  # trial seeds that get a fault
DIVERGES = 1e300  # ewc_lambda: λ·penalty overflows float32 at task 2's first step

FAULTS = tiny_experiment(
    "faults",
    run={
        "model": {"n_positions": 32},
        "stream": {
            "max_eval_blocks": 2,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "names", "builtin": "unicode_names"},
                {"name": "code", "builtin": "python_source", "max_docs": 200},
            ],
        },
        "components": {"ewc": {"fisher_samples": 4}},
        "hardware": {"threads": 1},
    },
    space={
        "lr": None,
        "seed": {"choice": [0, 1, RAISES, KILLED]},
        "ewc_lambda": {"choice": [0.0, DIVERGES]},
    },
    # random sampler seed 2 draws (seed, ewc_lambda): (2, 0) (1, 0) (3, 0) (0, 0) (1, 1e300)
    search={"num_samples": 5, "algorithm": "random", "seed": 2, "max_failures": 1},
)


def fate(params: dict[str, Any]) -> str:
    seed, lam = int(params["seed"]), float(params["ewc_lambda"])
    return "raise" if seed == RAISES else "kill" if seed == KILLED else "diverge" if lam else "ok"


def faulty_trainable(experiment_dir: Path, marker: Path) -> Any:
    """``continual_trainable`` with injected faults. Defined in a function so Ray's cloudpickle
    ships it by value to the workers (this test module is not importable there)."""
    from adaptune.trainables.trainable import continual_trainable

    def kill_after_second_checkpoint(trial_dir: Path) -> None:
        while not (trial_dir / "checkpoint_000001").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)  # like the OOM killer: no exception, no cleanup

    def trainable(config: dict[str, Any]) -> None:
        from ray import tune

        seed = config["seed"]
        if seed == RAISES:
            raise RuntimeError(f"injected fault for seed {seed}")
        if seed == KILLED:
            checkpoint = tune.get_checkpoint()
            if not marker.exists():
                marker.write_text("killed once\n")
                trial_dir = experiment_dir / f"trial-{tune.get_context().get_trial_id()}"
                threading.Thread(
                    target=kill_after_second_checkpoint, args=(trial_dir,), daemon=True
                ).start()
            else:
                marker.write_text(f"resumed from {checkpoint.path if checkpoint else None}\n")
        continual_trainable(config)

    return trainable


@pytest.mark.slow
def test_search_survives_an_error_a_nan_and_a_killed_worker(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    shared_ray: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "faults.yaml", FAULTS)
    marker = tmp_path / "killed.txt"
    inject = faulty_trainable(tmp_path / "runs" / "ray" / "faults", marker)
    monkeypatch.setattr(tuner, "run_search", functools.partial(tuner.run_search, trainable=inject))

    assert main(["search", "faults.yaml"]) == 0  # the search completes; a champion exists
    out = capsys.readouterr().out
    assert "champion: models:/adaptune-faults@champion" in out

    # Optuna: each trial's state follows its fault
    study = optuna.load_study(
        study_name="faults", storage=f"sqlite:///{tmp_path / 'runs/ray/faults/optuna.db'}"
    )
    trials = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    fates = {i: fate(t.params) for i, t in trials.items()}
    assert sorted(fates.values()) == ["diverge", "kill", "ok", "ok", "raise"], fates
    state = optuna.trial.TrialState
    for i, t in trials.items():
        assert t.state == (state.FAIL if fates[i] in ("raise", "diverge") else state.COMPLETE)
    (diverged,) = (i for i, f in fates.items() if f == "diverge")
    assert sorted(trials[diverged].intermediate_values) == [1]  # task 1 ran, task 2 diverged

    # MLflow: failed trials FAILED with the reason and the task, traceback as an artifact
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    (parent,) = (r for r in runs if PARENT_TAG not in r.data.tags)
    children = {r.data.tags[TRIAL_TAG]: r for r in runs if PARENT_TAG in r.data.tags}
    assert sorted(children) == sorted(trials)
    status = {i: r.info.status for i, r in children.items()}
    for i, f in fates.items():
        assert status[i] == ("FAILED" if f in ("raise", "diverge") else "FINISHED"), (f, status)

    (raised,) = (i for i, f in fates.items() if f == "raise")
    tags = children[raised].data.tags
    assert tags[ERROR_TAG] == (
        f"RuntimeError: injected fault for seed {RAISES} (during task 1/3 'docs')"
    )
    assert tags[FAILURES_TAG] == "2"  # tried, retried once (max_failures: 1), failed again
    text = _artifact(client, children[raised].info.run_id, tmp_path)
    assert "Failure # 1" in text and "Failure # 2" in text and "\x1b[" not in text
    assert 'in trainable\n    raise RuntimeError(f"injected fault' in text  # the traceback

    tags = children[diverged].data.tags
    assert tags[ERROR_TAG].startswith(
        "TrainingDivergedError: non-finite loss nan at task 2 ('names'), step 1/"
    ), tags[ERROR_TAG]
    assert tags["adaptune.tasks_done"] == "1"
    assert "TrainingDivergedError" in _artifact(client, children[diverged].info.run_id, tmp_path)

    # the killed worker: retried from a task checkpoint (not from scratch), in the same run
    (killed,) = (i for i, f in fates.items() if f == "kill")
    assert "resumed from " in marker.read_text() and "/checkpoint_00000" in marker.read_text()
    run = children[killed]
    assert run.data.tags[FAILURES_TAG] == "1" and "Actor" in run.data.tags["adaptune.last_failure"]
    history = client.get_metric_history(run.info.run_id, "stream_loss")
    # Ray registers a checkpoint in a save step after the result: a task whose result reached
    # MLflow but whose checkpoint did not is trained and logged again after the retry
    assert {m.step for m in history} == {1, 2, 3} and len(history) <= 4

    # the champion is a trial that ran every task
    champion = parent.data.tags["adaptune.champion_trial_id"]
    assert fates[champion] in ("ok", "kill")
    assert parent.info.status == "FINISHED"


def _artifact(client: MlflowClient, run_id: str, tmp: Path) -> str:
    path = client.download_artifacts(run_id, ERROR_ARTIFACT, str(tmp / f"dl-{run_id}"))
    return Path(path).read_text()


# ---- the error description, from Ray's error files --------------------------------------------


@dataclass
class FailedTrial:
    """What the callback reads from a failed ``ray.tune.experiment.Trial``."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None
    pickled_error_file: str | None = None
    num_failures: int = 1


def _failed(tmp: Path, exc: BaseException | None, done: int, text: str) -> FailedTrial:
    (tmp / "error.txt").write_text(text)
    pickled = None
    if exc is not None:
        pickled = tmp / "error.pkl"
        pickled.write_bytes(cloudpickle.dumps(exc))
    return FailedTrial(
        "t_00000",
        {"seed": 0},
        last_result={"task_index": done} if done else {},
        error_file=str(tmp / "error.txt"),
        pickled_error_file=str(pickled) if pickled else None,
    )


def test_error_names_the_exception_and_the_task_after_the_last_report(tmp_path: Path) -> None:
    text = "Failure # 1 (occurred at 2026-01-01)\nTraceback ...\nRuntimeError: boom\nmore\n"
    exc = RayTaskError("train", "Traceback ...\nRuntimeError: boom", RuntimeError("boom\nmore"))
    line, full = describe_error(_failed(tmp_path, exc, 1, text), TASKS)
    assert line == "RuntimeError: boom (during task 2/3 'names')"
    assert full == text
    line, _ = describe_error(_failed(tmp_path, exc, 0, text), TASKS)
    assert line == "RuntimeError: boom (during task 1/3 'docs')"


def test_a_divergence_names_its_own_task_and_step(tmp_path: Path) -> None:
    msg = "non-finite loss nan at task 2 ('names'), step 1/4"
    exc = RayTaskError("train", "Traceback ...", TrainingDivergedError(msg))
    line, _ = describe_error(_failed(tmp_path, exc, 1, "Traceback ...\n"), TASKS)
    assert line == f"TrainingDivergedError: {msg}"


def test_a_dead_worker_without_a_pickle_uses_the_error_text(tmp_path: Path) -> None:
    text = "Failure # 1\nThe actor died unexpectedly before finishing this task.\n"
    line, _ = describe_error(_failed(tmp_path, None, 2, text), TASKS)
    assert line == (
        "The actor died unexpectedly before finishing this task. (during task 3/3 'code')"
    )


def test_callback_logs_the_error_tag_the_traceback_and_retries(tmp_path: Path) -> None:
    exp = parse_experiment(
        tiny_experiment(
            "cb-faults",
            run={"stream": {"tasks": [{"name": n, "builtin": "python_docs"} for n in TASKS]}},
            space={"lr": None, "seed": {"choice": [0, 1]}},
            tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        )
    )
    callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
    callback.setup()
    text = "Failure # 1\nTraceback ...\nRuntimeError: boom\n"
    trial = _failed(tmp_path, RayTaskError("train", text, RuntimeError("boom")), 1, text)
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_recover(0, [trial], trial)  # FailureConfig retries it
    run = callback.client.get_run(callback.child_run_id(trial))
    assert run.info.status == "RUNNING" and run.data.tags[FAILURES_TAG] == "1"
    trial.num_failures = 2
    callback.on_trial_error(0, [trial], trial)  # ... and it fails again

    run = callback.client.get_run(callback.child_run_id(trial))
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] == "RuntimeError: boom (during task 2/3 'names')"
    assert run.data.tags[FAILURES_TAG] == "2"
    assert _artifact(callback.client, run.info.run_id, tmp_path) == text
