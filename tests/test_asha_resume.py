"""ASHA's rungs across ``--resume`` (search.asha): the scheduler driven directly, then a real Ray
Tune search interrupted mid-trial and resumed, against the same search run without a break."""

from __future__ import annotations

import pickle
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from adaptune.search.asha import AshaState, ResumableASHAScheduler, saved_asha_state
from adaptune.search.experiment import Experiment, parse_experiment
from adaptune.search.local_ray import LOCAL_RAY_ENV
from adaptune.search.locations import optuna_storage_file, search_location
from adaptune.search.searcher import build_searcher
from adaptune.search.tuner import build_tuner, restore_tuner, search_interrupted
from adaptune.spaces.paths import tune_key
from conftest import tiny_experiment
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.utils import flatten_dict

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE
T = 3  # tasks: ASHA (grace_period 1, reduction_factor 2) has rungs at tasks 1 and 2


# -- the scheduler, driven directly --------------------------------------------------------------
@dataclass
class FakeTrial:
    trial_id: str
    status: str = "PENDING"


def _asha(cls: type = ResumableASHAScheduler, **kwargs: Any) -> Any:
    asha = cls(max_t=T, grace_period=1, reduction_factor=2, **kwargs)
    asha.set_search_properties("stream_loss", "min")
    return asha


def _report(asha: Any, trial: FakeTrial, task: int, loss: float) -> str:
    return str(asha.on_trial_result(None, trial, {"training_iteration": task, "stream_loss": loss}))


def test_a_trial_reporting_a_rung_again_gets_its_first_decision() -> None:
    a, b, c = FakeTrial("a"), FakeTrial("b"), FakeTrial("c")
    live = _asha()
    for t in (a, b, c):
        live.on_trial_add(None, t)
    assert _report(live, a, 1, 1.0) == CONTINUE  # first at the rung: nothing to compare with
    assert _report(live, b, 1, 2.0) == STOP  # worse than the median of {a}
    assert _report(live, c, 1, 0.5) == CONTINUE
    # Tune's experiment snapshot: the callback's state, pickled as Tune pickles it
    snapshot = pickle.loads(pickle.dumps(AshaState(live).get_state()))

    # the resumed search: tuner.pkl's scheduler (empty rungs), then the snapshot, then Tune adds
    # the trials back; b had been stopped after the snapshot, and resumes from task 1 or 0
    resumed = _asha()
    AshaState(resumed).set_state(snapshot)
    for t in (a, b, c):
        resumed.on_trial_add(None, t)
    rungs = resumed.state_dict()["rungs"]
    assert (
        rungs == live.state_dict()["rungs"] == [[[2, {}], [1, {"a": -1.0, "b": -2.0, "c": -0.5}]]]
    )
    assert _report(resumed, b, 1, 2.0) == STOP  # the same rung again: the same decision
    assert _report(resumed, c, 1, 9.0) == CONTINUE  # retrained worse: its first record stands
    assert _report(resumed, b, 2, 0.1) == STOP  # past the rung that stopped it: still stopped
    resumed.on_trial_complete(None, b, {"training_iteration": 2, "stream_loss": 0.1})
    assert resumed.state_dict()["rungs"] == rungs  # neither b nor c recorded anew
    assert sorted(resumed.state_dict()["trials"]) == ["a", "c"]

    # Ray's ASHA lets the repeated report through: its decision would change on resume
    stock = _asha(ASHAScheduler)
    for t, loss in ((a, 1.0), (b, 2.0), (c, 0.5)):
        stock.on_trial_add(None, t)
        _report(stock, t, 1, loss)
    assert _report(stock, b, 1, 2.0) == CONTINUE


def test_a_restored_trial_keeps_its_bracket_and_other_rungs_are_refused() -> None:
    live = _asha(brackets=2)
    trials = [FakeTrial(f"t{i}") for i in range(40)]
    for t in trials:
        live.on_trial_add(None, t)
    state = pickle.loads(pickle.dumps(live.state_dict()))
    assert set(state["trials"].values()) == {0, 1}  # both brackets drawn (1 - 0.73**40)
    resumed = _asha(brackets=2)
    resumed.load_state_dict(state)
    for t in trials:
        resumed.on_trial_add(None, t)
    resumed.on_trial_add(None, FakeTrial("done", status="TERMINATED"))  # Tune adds it back too
    assert resumed.state_dict()["trials"] == state["trials"]

    other = ResumableASHAScheduler(max_t=4, grace_period=1, reduction_factor=2)
    with pytest.raises(ValueError, match=r"rungs at \[\[2, 1\], \[2\]\], this scheduler at"):
        other.load_state_dict(state)


def test_records_of_trials_tune_does_not_add_back_are_dropped() -> None:
    # the callback file from a snapshot newer than the trials' one (the driver was killed while
    # Tune uploaded them): it records `lost`, which Tune does not know and the searcher reruns
    live = _asha()
    for trial_id, loss in (("a", 1.0), ("lost", 0.5)):
        live.on_trial_add(None, FakeTrial(trial_id))
        _report(live, FakeTrial(trial_id), 1, loss)
    resumed = _asha()
    resumed.load_state_dict(live.state_dict())
    resumed.on_trial_add(None, FakeTrial("a", status="TERMINATED"))
    rerun = FakeTrial("rerun")
    resumed.on_trial_add(None, rerun)
    assert _report(resumed, rerun, 1, 0.5) == CONTINUE
    assert resumed.state_dict()["rungs"][0][1] == [1, {"a": -1.0, "rerun": -0.5}]
    assert sorted(resumed.state_dict()["trials"]) == ["rerun"]


# -- a real search, interrupted and resumed ------------------------------------------------------
def lookup_trainable(marks: Path) -> Any:
    """A trainable that reports a fixed loss per (lr, task) and checkpoints its task, except
    that the third trial and later ones report task 2 without a checkpoint (as when the driver
    dies while Tune saves it): one resumed there starts again from task 1. Each report is
    logged to ``marks/reports``. A closure, so Ray pickles it by value."""

    def trainable(config: dict[str, Any]) -> None:
        import json
        import math
        import tempfile

        lr = config["optim"]["lr"]
        trial_id = tune.get_context().get_trial_id()
        (marks / f"trial-{trial_id}").touch()
        ordinal = len(list(marks.glob("trial-*")))  # trials run one at a time
        first = 1
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                first = json.loads(Path(d, "task.json").read_text())["task"] + 1
        for task in range(first, T + 1):
            # each task has its own best lr, so the rungs rank trials differently
            loss = 2.0 + (math.log10(lr) + 2.4 + 0.3 * task) ** 2
            metrics = {"stream_loss": loss, "task_index": task}
            with (marks / "reports").open("a") as log:
                log.write(f"{trial_id} {task}\n")
            if task == 2 and ordinal >= 3:
                tune.report(metrics)
                continue
            with tempfile.TemporaryDirectory() as d:
                Path(d, "task.json").write_text(json.dumps({"task": task}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    return trainable


class CtrlC(tune.Callback):
    """Ctrl-C (SIGINT to this driver, which Tune handles) as soon as ASHA lets the third trial
    or a later one go on after task 2; once (``flag``)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag
        self.started: list[str] = []

    def on_trial_start(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
        self.started.append(trial.trial_id)

    def on_trial_result(
        self, iteration: int, trials: Any, trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if self.flag.exists() or result["task_index"] != 2 or result.get("done"):
            return  # done: ASHA stopped it
        if self.started.index(trial.trial_id) >= 2:
            self.flag.touch()
            signal.raise_signal(signal.SIGINT)  # Tune snapshots, then stops the trials


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in LOCAL_RAY_ENV.items():  # as run_search starts a local cluster
            mp.setenv(key, value)
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _experiment(tmp_path: Path, name: str) -> Experiment:
    return parse_experiment(
        tiny_experiment(
            name,
            search={
                "scheduler": "asha",
                "algorithm": "random",
                "num_samples": 5,
                "max_concurrent": 1,
                "seed": 7,
                "grace_period": 1,
                "reduction_factor": 2,
            },
            storage_path=str(tmp_path / "ray"),
        )
    )


def _fit(exp: Experiment, trainable: Any, callback: Any) -> Any:
    searcher = build_searcher(
        study_name=exp.name,
        storage_file=optuna_storage_file(exp),
        metric="stream_loss",
        mode="min",
        max_t=T,
        algorithm="random",
        seed=exp.search.seed,
    )
    tuner = build_tuner(exp, callback=callback, searcher=searcher, trainable=trainable, quiet=True)
    return tuner.fit()


def _outcome(exp: Experiment, results: Any) -> tuple[list[Any], list[float], dict[str, float]]:
    """The saved rungs with each trial named by its lr, the lrs of the trials ASHA stopped, and
    trial id -> lr (Ray's trial ids differ between searches)."""
    lr_of = {r.metrics["trial_id"]: flatten_dict(r.config)[tune_key("lr")] for r in results}
    state = saved_asha_state(search_location(exp))
    assert state is not None
    rungs = [
        [milestone, [(lr_of[t], value) for t, value in recorded.items()]]
        for milestone, recorded in state["rungs"][0]
    ]
    stopped = sorted(
        lr_of[r.metrics["trial_id"]] for r in results if r.metrics["training_iteration"] < T
    )
    return rungs, stopped, lr_of


@pytest.mark.slow
def test_a_resumed_search_stops_the_trials_an_unbroken_one_stops(
    tmp_path: Path, local_ray: None
) -> None:
    straight = _experiment(tmp_path, "straight")
    (tmp_path / "marks-straight").mkdir()
    trainable = lookup_trainable(tmp_path / "marks-straight")
    expected = _outcome(straight, _fit(straight, trainable, tune.Callback()))

    broken = _experiment(tmp_path, "broken")
    marks = tmp_path / "marks-broken"
    marks.mkdir()
    before = _fit(broken, lookup_trainable(marks), CtrlC(marks / "interrupted"))
    assert (marks / "interrupted").exists() and search_interrupted(broken)
    at_break = saved_asha_state(search_location(broken))
    assert at_break is not None and at_break["rungs"][0][0][1]  # trials recorded at task 2
    trials_before = {r.metrics["trial_id"] for r in before}
    (interrupted,) = [r.metrics["trial_id"] for r in before if r.metrics["task_index"] == 2]

    after = restore_tuner(broken, trainable=lookup_trainable(marks)).fit()
    assert not search_interrupted(broken)
    rungs, stopped, lr_of = _outcome(broken, after)
    assert len(lr_of) == 5 and all(r.error is None for r in after)
    assert (rungs, stopped) == expected[:2]
    assert sorted(lr_of.values()) == sorted(expected[2].values())
    # the interrupted trial resumed from task 1 and reported task 2 again, and a trial started
    # after the resume was stopped against rungs recorded before it
    reports = (marks / "reports").read_text().splitlines()
    assert reports.count(f"{interrupted} 2") == 2
    # (its task 3 may have begun in the worker while Tune stopped the interrupted search)
    assert {line for line in reports if reports.count(line) > 1} <= {
        f"{interrupted} 2",
        f"{interrupted} 3",
    }
    assert {lr_of[t] for t in lr_of if t not in trials_before} & set(stopped)
