"""Tune's controller loop waits for events (search.tune_loop) instead of polling at 10 Hz.

The real Ray Tune runs the same sleeping trial twice on a local cluster started the way
``adaptune search`` starts one (the ``shared_ray`` fixture: ``search.local_ray.LOCAL_RAY_ENV`` in
its environment), with Tune's own wait and with adaptune's; a callback counts the controller's
steps. If Ray moves or renames the wait that ``patient_controller`` replaces, both runs take as
many steps and the test fails.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from adaptune.search.tune_loop import EVENT_WAIT_S, TUNE_STEP_WAIT_S, patient_controller
from ray import tune
from ray.air.execution._internal.actor_manager import RayActorManager

SLEEP_S = 3.0


class StepCounter(tune.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.steps += 1


def fit_counting_steps(storage: Path, name: str) -> tuple[int, Any]:
    sleep_s = SLEEP_S

    def sleeper(config: dict[str, Any]) -> None:  # a closure: Ray pickles it by value
        import os

        time.sleep(sleep_s)
        tune.report({"value": 1.0, "niceness": os.nice(0)})

    counter = StepCounter()
    tuner = tune.Tuner(
        sleeper,
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), callbacks=[counter], verbose=0
        ),
    )
    results = tuner.fit()
    return counter.steps, results


@pytest.mark.slow
def test_the_controller_takes_a_step_per_event_not_ten_a_second(
    tmp_path: Path, shared_ray: None
) -> None:
    tune_steps, _ = fit_counting_steps(tmp_path, "tune-wait")
    with patient_controller() as patched:
        assert patched
        steps, results = fit_counting_steps(tmp_path, "adaptune-wait")
    assert results[0].metrics["value"] == 1.0  # the trial's result still arrives
    # the trial ran at the priority of a plain training script, not Ray's nice 15
    assert results[0].metrics["niceness"] == 0
    # Tune's own wait: at least one step per 0.1 s while the trial sleeps
    assert tune_steps >= SLEEP_S / TUNE_STEP_WAIT_S / 2
    # adaptune's: the events (placement group, actor start, result, stop) plus one step per
    # EVENT_WAIT_S of sleep; far fewer than Tune's
    assert steps < tune_steps / 2
    assert RayActorManager.next.__name__ == "next"  # restored on leaving the block


def test_only_the_controllers_step_wait_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float | None] = []

    def record(self: Any, timeout: float | None = None) -> bool:
        seen.append(timeout)
        return False

    monkeypatch.setattr(RayActorManager, "next", record)
    manager = object.__new__(RayActorManager)  # no Ray needed: only the timeout is read
    with patient_controller():
        manager.next(timeout=TUNE_STEP_WAIT_S)
        manager.next(timeout=1)  # Tune's wait while actors stop: left alone
        manager.next()
    manager.next(timeout=TUNE_STEP_WAIT_S)
    assert seen == [EVENT_WAIT_S, 1, None, TUNE_STEP_WAIT_S]
