"""Warm start: a search's Optuna study begins with an earlier search's COMPLETE trials.

One earlier search (2 tasks, 4 trials) is run once for the module; a search over an extended
stream (3 tasks) and a narrowed space starts from it by name, is interrupted (SIGINT from its
second trial) and resumed; the same search resolved by parent run id gives the same trials;
bad settings are refused with one line before anything is written. The searches run on the
tests' shared local Ray.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from adaptune.search.cli import main
from adaptune.search.experiment import load_experiment, parse_experiment
from adaptune.search.tags import (
    KIND_SEARCH,
    KIND_TAG,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_TAG,
    PARENT_TAG,
    TRIAL_TAG,
    WARM_ENQUEUED_ATTR,
    WARM_RUN_ATTR,
    WARM_START_RUN_TAG,
    WARM_TRIAL_ATTR,
)
from adaptune.search.tuner import run_search
from adaptune.search.warm import give_warm_start, load_warm_start, new_distributions, select_trials
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

DOCS = {"name": "docs", "builtin": "python_docs"}
CODE = {"name": "code", "builtin": "python_source"}
UNICODE = {"name": "unicode", "builtin": "unicode_names"}
SPACE = {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "buffer_size": {"choice": [0, 32]}}


def _experiment(root: Path, name: str, **changes: Any) -> dict[str, Any]:
    """A tiny experiment whose search folder and MLflow store are under ``root``."""
    data = tiny_experiment(name, **{"space": SPACE, **changes})
    data["storage_path"] = str(root / "runs" / "ray")
    data["tracking"] = {"tracking_uri": f"sqlite:///{root / 'runs' / 'mlflow.db'}"}
    return data


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory, shared_ray: None) -> Any:
    """The earlier search "yesterday": 2 tasks, 4 FIFO trials; its parent run and study."""
    root = tmp_path_factory.mktemp("warm")
    data = _experiment(
        root, "yesterday", run={"stream": {"tasks": [DOCS, CODE]}},
        search={"num_samples": 4, "max_concurrent": 2, "seed": 1},
    )
    summary = run_search(load_experiment(write_experiment(root / "yesterday.yaml", data)),
                         quiet=True)
    study = optuna.load_study(
        study_name="yesterday", storage=f"sqlite:///{root / 'runs/ray/yesterday/optuna.db'}"
    )
    return root, summary.parent_run_id, study


def _today(root: Path, name: str, *, hi: float, **search: Any) -> dict[str, Any]:
    """The new search: one more task, ``lr`` capped at ``hi``, warm-started from yesterday."""
    space = {**SPACE, "lr": {"loguniform": [1.0e-4, hi]}}
    return _experiment(
        root, name, run={"stream": {"tasks": [DOCS, CODE, UNICODE]}}, space=space,
        search={"num_samples": 3, "max_concurrent": 1, "seed": 2, "warm_start": "yesterday",
                **search},
    )


def _inside(study: Any, hi: float) -> list[Any]:
    """The earlier COMPLETE trials inside the narrowed space, best first."""
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return sorted((t for t in complete if t.params["lr"] <= hi), key=lambda t: t.value)


def test_which_earlier_trials_fit_the_new_space_and_are_given_once() -> None:
    """The rule on a real (in-memory) study: inside a searched distribution, equal to a fixed
    value, an unsearched one filled from the earlier experiment, PRUNED ones left out."""
    old = parse_experiment(tiny_experiment(
        "old", space=SPACE, run={"components": {"distill": {"distill_alpha": 0.5}}}
    ))
    new = parse_experiment(tiny_experiment("new", space={
        "lr": {"loguniform": [1.0e-4, 5.0e-3]}, "buffer_size": 32,
        "distill_alpha": {"uniform": [0.0, 1.0]},
    }, search={"warm_start": "old", "warm_start_enqueue": 1}))
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "buffer_size": optuna.distributions.CategoricalDistribution([0, 32]),
    }
    study = optuna.create_study(direction="minimize")
    for lr, buffer, value in [(1e-3, 32, 3.0), (1e-3, 0, 2.0), (8e-3, 32, 1.0), (2e-3, 32, 2.5)]:
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "buffer_size": buffer}, distributions=dists, value=value
        ))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params={"lr": 2e-3, "buffer_size": 32},
        distributions=dists, intermediate_values={1: 0.5},
    ))

    warm = select_trials(new, old, study, source="old", parent_run_id="r" * 32)
    assert [t.user_attrs[WARM_TRIAL_ATTR] for t in warm.trials] == [0, 3]
    assert [t.params for t in warm.trials] == [
        {"lr": 1e-3, "distill_alpha": 0.5}, {"lr": 2e-3, "distill_alpha": 0.5}
    ]  # buffer_size, fixed now, is dropped; distill_alpha is the earlier fixed value
    assert [t.value for t in warm.trials] == [3.0, 2.5]
    assert warm.complete == 4 and warm.outside == 2
    assert warm.first_outside == "trial 1: buffer_size=0, and this search fixes buffer_size=32"
    assert warm.enqueue == [(3, {"lr": 2e-3, "distill_alpha": 0.5})]  # the best inside

    target = optuna.create_study(direction="minimize")
    assert give_warm_start(target, warm) == (2, 1)
    assert give_warm_start(target, warm) == (0, 0)  # a reopened study: nothing twice
    assert len(target.trials) == 3
    first = target.ask(fixed_distributions=new_distributions(new))
    assert first.params == {"lr": 2e-3, "distill_alpha": 0.5}
    assert first.user_attrs[WARM_ENQUEUED_ATTR] == 3


def interrupting_trainable(starts: Path, driver: int) -> Any:
    """``continual_trainable`` whose second start (trials run one at a time) sends Ctrl-C to
    the driver. Defined in a function so Ray's cloudpickle ships it by value (this module is
    not importable there)."""
    from adaptune.trainables.trainable import continual_trainable

    def trainable(config: dict[str, Any]) -> None:
        with starts.open("a") as f:
            f.write("start\n")
        if len(starts.read_text().splitlines()) == 2:
            os.kill(driver, signal.SIGINT)
            time.sleep(3)  # the driver stops the search before this trial reports
        continual_trainable(config)

    return trainable


@pytest.mark.slow
def test_warm_started_search_gives_enqueues_records_and_resumes_once(earlier: Any) -> None:
    root, source_run, source = earlier
    lrs = sorted(t.params["lr"] for t in source.trials if t.state.name == "COMPLETE")
    assert len(lrs) == 4
    hi = lrs[-1] * 0.999  # the earlier trial with the largest lr falls outside
    inside = _inside(source, hi)
    path = write_experiment(
        root / "today.yaml", _today(root, "today", hi=hi, num_samples=2, warm_start_enqueue=1)
    )
    exp = load_experiment(path)
    trainable = interrupting_trainable(root / "starts", os.getpid())
    first = run_search(exp, trainable=trainable, quiet=True)
    assert first.interrupted

    db = f"sqlite:///{root / 'runs/ray/today/optuna.db'}"
    given = [t for t in optuna.load_study(study_name="today", storage=db).trials
             if WARM_TRIAL_ATTR in t.user_attrs]
    assert len(given) == len(inside) == 3
    summary = run_search(exp, trainable=trainable, resume=True, quiet=True)
    assert not summary.interrupted and summary.model_uri

    study = optuna.load_study(study_name="today", storage=db)
    given = [t for t in study.trials if WARM_TRIAL_ATTR in t.user_attrs]
    ran = [t for t in study.trials if WARM_TRIAL_ATTR not in t.user_attrs]
    # the earlier COMPLETE trials inside the space, given once (not again on --resume), with
    # their earlier values and parameters
    assert sorted((t.user_attrs[WARM_TRIAL_ATTR], t.value) for t in given) == sorted(
        (t.number, t.value) for t in inside
    )
    assert all(t.state.name == "COMPLETE" and t.params == s.params for t, s in zip(
        sorted(given, key=lambda t: t.user_attrs[WARM_TRIAL_ATTR]),
        sorted(inside, key=lambda t: t.number), strict=True,
    ))
    assert {t.user_attrs[WARM_RUN_ATTR] for t in given} == {source_run}
    assert max(t.number for t in given) < min(t.number for t in ran)  # before TPE's first
    # the best one was enqueued and ran first, on this stream, with the earlier lr
    assert len(ran) == 2 and all(t.state.name == "COMPLETE" for t in ran)
    enqueued = [t for t in ran if WARM_ENQUEUED_ATTR in t.user_attrs]
    assert len(enqueued) == 1 and enqueued[0].user_attrs[WARM_ENQUEUED_ATTR] == inside[0].number
    assert enqueued[0].params == inside[0].params
    assert sorted(enqueued[0].intermediate_values) == [1, 2, 3]

    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.params["search.warm_start"] == "yesterday"
    assert parent.data.params["search.warm_start_enqueue"] == "1"
    assert parent.data.tags[WARM_START_RUN_TAG] == source_run
    assert parent.data.metrics["warm_start/given"] == 3
    assert parent.data.metrics["warm_start/enqueued"] == 1
    assert parent.data.metrics["warm_start/outside"] == 1
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{summary.parent_run_id}'"
    )
    first_run = next(r for r in children if r.info.run_name.startswith("t01-"))
    assert first_run.data.tags[TRIAL_TAG] == enqueued[0].user_attrs["ray_trial_id"]
    assert float(first_run.data.params["lr"]) == inside[0].params["lr"]
    assert first_run.data.params["buffer_size"] == str(inside[0].params["buffer_size"])


@pytest.mark.slow
def test_by_parent_run_id_gives_the_same_trials_and_the_dry_run_says_so(
    earlier: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    root, source_run, source = earlier
    hi = 1.0e-2
    by_name = load_warm_start(load_experiment(
        write_experiment(root / "a.yaml", _today(root, "by-name", hi=hi, warm_start_enqueue=2))
    ))
    path = write_experiment(root / "b.yaml", _today(
        root, "by-id", hi=hi, warm_start=source_run, warm_start_enqueue=2
    ))
    by_id = load_warm_start(load_experiment(path))
    assert by_name is not None and by_id is not None
    assert by_id.source == by_name.source == "yesterday"
    assert by_id.parent_run_id == by_name.parent_run_id == source_run
    inside = _inside(source, hi)
    assert by_id.given == len(inside) == 4 and by_id.outside == 0
    assert [(t.params, t.values) for t in by_id.trials] == [
        (t.params, t.values) for t in by_name.trials
    ]
    assert [n for n, _ in by_id.enqueue] == [t.number for t in inside[:2]]

    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        f"warm start: 4 of 4 COMPLETE trials of the search 'yesterday' (parent run "
        f"{source_run}) given to the study, best 2 enqueued to run first" in out
    )
    assert not (root / "runs/ray/by-id").exists()


def _refused(
    root: Path, capsys: pytest.CaptureFixture[str], name: str, **changes: Any
) -> list[str]:
    """Run ``adaptune search`` on a new search ``name``: exit 2, nothing written; the error
    lines."""
    data = _today(root, name, hi=1.0e-2)
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    path = write_experiment(root / f"{name}.yaml", data)
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("adaptune: error:")]
    assert errors, err
    assert not (root / "runs" / "ray" / name).exists()
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    assert client.get_experiment_by_name(name) is None
    return errors


def _one_line(root: Path, capsys: pytest.CaptureFixture[str], name: str, **changes: Any) -> str:
    errors = _refused(root, capsys, name, **changes)
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.slow
def test_bad_warm_starts_are_refused_in_one_line_before_anything_is_written(
    earlier: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    root, source_run, _ = earlier
    err = _one_line(root, capsys, "bad1", search={"warm_start": "nosuch"})
    assert "search.warm_start: no search named 'nosuch'" in err
    assert "yesterday" in err.split("searches there: ")[1].split(", ")
    err = _one_line(root, capsys, "bad2", search={"warm_start": "0" * 32})
    assert f"no search named {'0' * 32!r} and no search parent run of that id" in err
    err = _one_line(root, capsys, "bad3", search={"warm_start": None, "warm_start_enqueue": 2})
    assert "search.warm_start_enqueue: needs search.warm_start" in err
    err = _one_line(root, capsys, "bad4", search={"warm_start_enqueue": 4})
    assert "search.warm_start_enqueue: must be <= search.num_samples (3)" in err
    err = _one_line(root, capsys, "bad5", space={"lr": {"loguniform": [5.0e-2, 1.0e-1]}})
    assert "none of the 4 COMPLETE trials of the search 'yesterday' lies in this" in err
    assert "(first: trial 0: lr=" in err and "is outside log-[0.05, 0.1])" in err

    # an earlier search whose study is gone: a parent run naming a missing sqlite file
    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    source = client.get_run(source_run)
    missing = root / "gone" / "optuna.db"
    ghost = client.create_run(source.info.experiment_id, tags={
        KIND_TAG: KIND_SEARCH, OPTUNA_STUDY_TAG: "ghost", OPTUNA_STORAGE_TAG: f"sqlite:///{missing}",
    })
    yaml_text = (root / "yesterday.yaml").read_text()
    client.log_text(ghost.info.run_id, yaml_text, "experiment.yaml")
    err = _one_line(root, capsys, "bad6", search={"warm_start": "ghost"})
    assert "cannot open the Optuna study of the search 'ghost'" in err
    assert f"{missing} does not exist" in err and not missing.parent.exists()

    # pbt keeps no Optuna study (other lines may name what else pbt needs)
    errors = _refused(root, capsys, "bad7", search={"algorithm": "pbt"})
    warm = [ln for ln in errors if "warm_start" in ln]
    assert len(warm) == 1
    assert "search.warm_start: seeds an Optuna study; valid with search.algorithm tpe" in warm[0]
