"""OptunaSearch that tells Optuna the truth about trials ASHA stopped early.

Stock ``OptunaSearch.on_trial_complete`` records a trial ASHA stopped at task 1 as COMPLETE with
its task-1 score, so TPE learns from low-fidelity scores as if they were final. Here a trial
that stopped before the last task reaches Optuna as PRUNED with its per-task intermediate values,
an errored trial as FAIL, and only a trial that ran every task as COMPLETE.

With a list of metrics and modes the study is multi-objective (one direction per metric). Optuna
refuses intermediate values there (``Trial.report`` raises), so such a study gets none: a trial
that ran every task is COMPLETE with its final value of each metric, one stopped early is PRUNED
without values, an errored one FAIL. Tune itself follows one metric (``TuneConfig``'s, the
primary one); the searcher keeps its own list.

Optuna parameters carry the run's flat hyperparameter names (``lr``, ``ewc_lambda``), not Tune's
nested paths (``optim/lr``), so the study, its importances and optuna-dashboard read like the YAML.
The study lives in persistent storage (sqlite) to survive a restart.

On a resumed search (``Tuner.restore``) Tune restores this searcher from its last experiment
snapshot, which can be behind the study: the study is written at once, the snapshot every few
seconds. :meth:`ContinualOptunaSearch.restore` reconciles the two (see there), so the study ends
with exactly one Optuna trial per Tune trial and no trial is told twice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from adaptune.search.experiment import Experiment
from adaptune.search.locations import optuna_storage_file
from adaptune.search.tags import LOST_RAY_TRIAL_ATTR
from adaptune.search.warm import WarmStart, give_warm_start
from adaptune.spaces.paths import from_tune_key, tune_key
from adaptune.trainables.config import HYPERPARAMETERS
from ray.air.constants import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict


class ContinualOptunaSearch(OptunaSearch):
    """OptunaSearch with PRUNED/FAIL/COMPLETE states that respect the task stream.

    Args:
        max_t: number of tasks in the stream; a trial is COMPLETE only after task ``max_t``.
        step_key: result key holding the task index (falls back to ``training_iteration``).
        **kwargs: passed to :class:`ray.tune.search.optuna.OptunaSearch`
            (``metric``, ``mode``: a list of each for a multi-objective study; ``sampler``,
            ``study_name``, ``storage``, ...).

    Example:
        >>> searcher = ContinualOptunaSearch(max_t=3, metric="stream_loss", mode="min")
    """

    def __init__(
        self,
        *,
        max_t: int,
        step_key: str = "task_index",
        warm_start: WarmStart | None = None,
        **kwargs: Any,
    ) -> None:
        if max_t < 1:
            raise ValueError(f"`max_t >= 1` must hold, but got max_t={max_t}")
        self._max_t = max_t
        self._step_key = step_key
        self._warm_start = warm_start  # an earlier search's trials (search.warm_start)
        self._reported: dict[str, set[int]] = {}
        self._orphans: list[int] = []  # study trial numbers asked for but unknown to Tune
        super().__init__(**kwargs)

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (created once Tune hands over the search space)."""
        if self._ot_study is None:
            raise RuntimeError("the study exists once the search space is set")
        return self._ot_study

    @property
    def multi_objective(self) -> bool:
        return isinstance(self._metric, list)

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any
    ) -> bool:
        if self.multi_objective:  # Tune passes its one (primary) metric: keep every objective
            metric, mode = None, None
        return bool(super().set_search_properties(metric, mode, config, **spec))

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        # Tune sets the space, which creates (or reopens) the study, before the first
        # suggestion: the earlier trials are there for TPE's first draw. On --resume the study
        # reopens holding them and give_warm_start adds nothing.
        warm = getattr(self, "_warm_start", None)  # absent from a searcher pickled before it
        if warm is not None:
            give_warm_start(self.study, warm)

    # -- names: Tune's "optim/lr" <-> Optuna's "lr" ------------------------------------------
    @staticmethod
    def convert_search_space(spec: dict[str, Any]) -> dict[str, Any]:
        converted = OptunaSearch.convert_search_space(spec)
        return {from_tune_key(path): dist for path, dist in converted.items()}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self._ot_trials and self._orphans:
            self._adopt_orphan(trial_id)
        flat = super().suggest(trial_id)
        if not isinstance(flat, dict):
            return flat  # None or Searcher.FINISHED
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return unflatten_dict(
            {tune_key(k) if k in HYPERPARAMETERS else k: v for k, v in flat.items()}
        )

    # -- trial states -------------------------------------------------------------------------
    def _step(self, result: dict[str, Any]) -> int | None:
        step = result.get(self._step_key, result.get(TRAINING_ITERATION))
        return int(step) if isinstance(step, int | float) else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self.multi_objective:
            return  # Optuna takes no intermediate values in a multi-objective study
        value, step = result.get(self._metric), self._step(result)
        if step is not None and _finite(value):
            self._report(trial_id, float(value), step)  # type: ignore[arg-type]

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        result = result or {}
        metrics = self._metric if self.multi_objective else [self._metric]
        values, step = [result.get(m) for m in metrics], self._step(result)
        if not error and step is not None and all(_finite(v) for v in values):
            # A result that makes the scheduler stop a trial (ASHA at a rung, or at max_t)
            # reaches only on_trial_complete, never on_trial_result.
            if not self.multi_objective:
                self._report(trial_id, float(values[0]), step)  # type: ignore[arg-type]
            if step >= self._max_t:
                super().on_trial_complete(trial_id, result=result)  # COMPLETE, final value(s)
                return
        state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        self.study.tell(self._ot_trials[trial_id], state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    # -- resume -------------------------------------------------------------------------------
    def restore(self, checkpoint_path: str) -> None:
        """Restore Tune's snapshot of this searcher, then reconcile it with the study.

        A driver killed between a study write and Tune's next snapshot leaves the study ahead:

        - a trial the snapshot holds as running may already be finished in the study (its last
          result was told, the snapshot was not yet written): it is marked completed here, so
          when Tune finishes it again nothing is told twice;
        - a trial asked for after the snapshot is RUNNING in the study but unknown to Tune,
          whose restored counter will ask for that many trials again: each of those asks
          adopts one such orphan (same study trial, same parameters, user attribute
          ``adaptune.lost_ray_trial_id``) instead of adding a trial, so the study ends with
          exactly ``num_samples`` trials. An orphan killed inside ``ask`` (parameters missing)
          never ran and is told FAIL. The snapshot's sampler had not drawn the orphans yet:
          left alone, its seeded generator would propose their parameters again for the next
          new trials, so it is reseeded (the rest of such a search is not reproducible by seed).
        """
        super().restore(checkpoint_path)
        if self._ot_study is None or self._storage is None:
            return  # no space yet, or an in-memory study: it was restored with the snapshot
        in_study = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        known = set()
        for trial_id, ot_trial in self._ot_trials.items():
            known.add(ot_trial.number)
            frozen = in_study.get(ot_trial.number)
            if frozen is None:
                continue
            if frozen.state.is_finished():
                self._completed_trials.add(trial_id)
            # tasks reported after the snapshot: a resumed trial reports them again
            self._reported.setdefault(trial_id, set()).update(frozen.intermediate_values)
        self._orphans = []
        for number, frozen in sorted(in_study.items()):
            if number in known or frozen.state != optuna.trial.TrialState.RUNNING:
                continue
            self.study.sampler.reseed_rng()
            if set(frozen.params) == set(self._space or {}):
                self._orphans.append(number)
            else:
                fail = optuna.trial.TrialState.FAIL
                self.study.tell(self._trial(number), state=fail, skip_if_finished=True)

    def _adopt_orphan(self, trial_id: str) -> None:
        storage_id = self._storage_id(self._orphans.pop(0))
        ot_trial = optuna.Trial(self.study, storage_id)
        lost = ot_trial.user_attrs.get("ray_trial_id")
        ot_trial.set_user_attr(LOST_RAY_TRIAL_ATTR, lost)
        self._ot_trials[trial_id] = ot_trial
        # the lost run's reports stand (Optuna keeps the first value reported for a step)
        self._reported[trial_id] = set(self._storage.get_trial(storage_id).intermediate_values)

    def _trial(self, number: int) -> optuna.Trial:
        """The study's trial ``number`` as an ``optuna.Trial`` that can report and be told."""
        return optuna.Trial(self.study, self._storage_id(number))

    def _storage_id(self, number: int) -> int:
        study_id = self._storage.get_study_id_from_name(self.study.study_name)
        return int(self._storage.get_trial_id_from_study_id_trial_number(study_id, number))

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
    metric: str | list[str],
    mode: str | list[str],
    max_t: int,
    algorithm: str = "tpe",
    seed: int = 0,
    warm_start: WarmStart | None = None,
) -> ContinualOptunaSearch:
    """The searcher for one experiment: seeded sampler, sqlite-backed study.

    Args:
        study_name: the Optuna study name (the experiment's name).
        storage_file: sqlite file holding the study; its parent directory is created.
        metric: objective key in the trainable's results; a list: a multi-objective study.
        mode: ``"min"`` or ``"max"``; a list: one per metric.
        max_t: number of tasks in the stream.
        algorithm: ``"tpe"`` (seeded TPE) or ``"random"``.
        seed: the sampler's seed.
        warm_start: an earlier search's trials, given to the study when it is created
            (:func:`search.warm.load_warm_start`).
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
        warm_start=warm_start,
    )


def experiment_searcher(
    exp: Experiment, max_t: int, warm_start: WarmStart | None = None
) -> ContinualOptunaSearch:
    """:func:`build_searcher` with the experiment's study name, storage and ``search`` settings
    (what ``adaptune search`` drives)."""
    return build_searcher(
        study_name=exp.name,
        storage_file=optuna_storage_file(exp),
        metric=exp.search.metric,
        mode=exp.search.mode,
        max_t=max_t,
        algorithm=exp.search.algorithm,
        seed=exp.search.seed,
        warm_start=warm_start,
    )
