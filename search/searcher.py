"""OptunaSearch that tells Optuna the truth about trials ASHA stopped early.

Stock ``OptunaSearch.on_trial_complete`` records a trial ASHA stopped at task 1 as COMPLETE with
its task-1 score, so TPE learns from low-fidelity scores as if they were final. Here a trial
that stopped before the last task reaches Optuna as PRUNED with its per-task intermediate values,
an errored trial as FAIL, and only a trial that ran every task as COMPLETE.

Optuna parameters carry the run's flat hyperparameter names (``lr``, ``ewc_lambda``), not Tune's
nested paths (``optim/lr``), so the study, its importances and optuna-dashboard read like the YAML.
The study lives in persistent storage (sqlite) to survive a restart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from ray.air.constants import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from trainables.config import HYPERPARAMETERS

_BY_PATH = {"/".join(path): name for name, path in HYPERPARAMETERS.items()}


class ContinualOptunaSearch(OptunaSearch):
    """OptunaSearch with PRUNED/FAIL/COMPLETE states that respect the task stream.

    Args:
        max_t: number of tasks in the stream; a trial is COMPLETE only after task ``max_t``.
        step_key: result key holding the task index (falls back to ``training_iteration``).
        **kwargs: passed to :class:`ray.tune.search.optuna.OptunaSearch`
            (``metric``, ``mode``, ``sampler``, ``study_name``, ``storage``, ...).

    Example:
        >>> searcher = ContinualOptunaSearch(max_t=3, metric="stream_loss", mode="min")
    """

    def __init__(self, *, max_t: int, step_key: str = "task_index", **kwargs: Any) -> None:
        if max_t < 1:
            raise ValueError(f"`max_t >= 1` must hold, but got max_t={max_t}")
        self._max_t = max_t
        self._step_key = step_key
        self._reported: dict[str, set[int]] = {}
        super().__init__(**kwargs)

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (created once Tune hands over the search space)."""
        if self._ot_study is None:
            raise RuntimeError("the study exists once the search space is set")
        return self._ot_study

    # -- names: Tune's "optim/lr" <-> Optuna's "lr" ------------------------------------------
    @staticmethod
    def convert_search_space(spec: dict[str, Any]) -> dict[str, Any]:
        converted = OptunaSearch.convert_search_space(spec)
        return {_BY_PATH.get(path, path): dist for path, dist in converted.items()}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        flat = super().suggest(trial_id)
        if not isinstance(flat, dict):
            return flat  # None or Searcher.FINISHED
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        paths = {k: "/".join(HYPERPARAMETERS[k]) if k in HYPERPARAMETERS else k for k in flat}
        return unflatten_dict({paths[k]: v for k, v in flat.items()})

    # -- trial states -------------------------------------------------------------------------
    def _step(self, result: dict[str, Any]) -> int | None:
        step = result.get(self._step_key, result.get(TRAINING_ITERATION))
        return int(step) if isinstance(step, int | float) else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value, step = result.get(self._metric), self._step(result)
        if step is not None and _finite(value):
            self._report(trial_id, float(value), step)  # type: ignore[arg-type]

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        result = result or {}
        value, step = result.get(self._metric), self._step(result)
        if not error and step is not None and _finite(value):
            # A result that makes the scheduler stop a trial (ASHA at a rung, or at max_t)
            # reaches only on_trial_complete, never on_trial_result.
            self._report(trial_id, float(value), step)  # type: ignore[arg-type]
            if step >= self._max_t:
                super().on_trial_complete(trial_id, result=result)  # COMPLETE, final value
                return
        state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        self.study.tell(self._ot_trials[trial_id], state=state)
        self._completed_trials.add(trial_id)

    def _report(self, trial_id: str, value: float, step: int) -> None:
        steps = self._reported.setdefault(trial_id, set())
        if step not in steps:  # a restored trial may report a task again
            self._ot_trials[trial_id].report(value, step)
            steps.add(step)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def build_searcher(
    *,
    study_name: str,
    storage_file: Path,
    metric: str,
    mode: str,
    max_t: int,
    algorithm: str = "tpe",
    seed: int = 0,
) -> ContinualOptunaSearch:
    """The searcher for one experiment: seeded sampler, sqlite-backed study.

    Args:
        study_name: the Optuna study name (the experiment's name).
        storage_file: sqlite file holding the study; its parent directory is created.
        metric: objective key in the trainable's results.
        mode: ``"min"`` or ``"max"``.
        max_t: number of tasks in the stream.
        algorithm: ``"tpe"`` (seeded TPE) or ``"random"``.
        seed: the sampler's seed.
    """
    storage_file.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_file.resolve()}")
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if algorithm == "random"
        else optuna.samplers.TPESampler(seed=seed)
    )
    return ContinualOptunaSearch(
        max_t=max_t,
        metric=metric,
        mode=mode,
        sampler=sampler,
        study_name=study_name,
        storage=storage,
    )
