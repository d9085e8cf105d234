"""Confirming the champion over seeds: the second Tune fit (the rule is :mod:`search.confirm`).

Once a search's trials end, :class:`ConfirmRunner` runs the confirmation plans on the same Ray
(the one the search started; it is released afterwards) as one more ``Tuner.fit()``: a fixed
list of configs handed out in order by :class:`FixedConfigs`, FIFO (every run runs every
task), the search's trainable, resources, ``max_concurrent`` and ``max_failures``, in
``<storage_path>/<name>/confirm``. :class:`ConfirmTrackingCallback` records each run as a
child run of the search's parent run, tagged ``adaptune.kind=confirm``, ``adaptune.confirm=true``,
``adaptune.confirm_of=<trial id>`` and ``adaptune.seed=<seed>``; it logs what a trial's run
logs (params, per-task metrics, the loss matrix).

The confirmation is not part of ``--resume``: a search resumed after its driver died during
the confirmation runs it again from the start (the lost runs end KILLED).
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptune.search.confirm import (
    CONFIRM_DIR,
    ConfirmPlan,
    ConfirmStats,
    confirm_note,
    confirm_plans,
    confirmed_winner,
    final_values,
    log_confirmation,
    ranked_trials,
    top_configurations,
)
from adaptune.search.experiment import Experiment
from adaptune.search.locations import search_location
from adaptune.search.records import trial_params
from adaptune.search.select import search_rule
from adaptune.search.tags import (
    CONFIRM_OF_TAG,
    CONFIRM_TAG,
    KIND_CONFIRM,
    KIND_TAG,
    PARENT_TAG,
    SEED_TAG,
    TRIAL_TAG,
)
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.spaces.paths import get_hp, tune_key
from mlflow.entities import Param
from ray.tune.search import Searcher


class FixedConfigs(Searcher):
    """Hands out ``plans``' configs in order, one per trial, then says it is finished.

    ``given`` maps each Ray trial id to its plan (the callback and the runner read it).
    """

    def __init__(self, plans: Sequence[ConfirmPlan]) -> None:
        super().__init__()
        self.plans = list(plans)
        self.given: dict[str, ConfirmPlan] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if len(self.given) >= len(self.plans):
            return Searcher.FINISHED
        plan = self.plans[len(self.given)]
        self.given[trial_id] = plan
        return copy.deepcopy(plan.config)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        pass  # nothing to learn: the configs are fixed

    # Tune snapshots its searcher with the experiment; without these it warns at every snapshot
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump((self.plans, self.given), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.plans, self.given = pickle.load(f)  # noqa: S301 - our own snapshot


class ConfirmTrackingCallback(MlflowTrackingCallback):
    """The search's MLflow logging for confirmation runs: each a child of the search's parent
    run, tagged with the trial it confirms and its seed (module docstring).

    Args:
        search: the search's callback (its parent run and MLflow experiment).
        given: Ray trial id -> plan, filled by :class:`FixedConfigs` as it hands configs out.
    """

    def __init__(self, search: MlflowTrackingCallback, given: Mapping[str, ConfirmPlan]) -> None:
        super().__init__(search.exp, experiment_yaml=search.experiment_yaml)
        self.tracking_uri = search.tracking_uri
        self.parent_run_id = search.start_parent()
        self.experiment_id = search.experiment_id
        self.given = given

    def child_run_id(self, trial: Any, trials: list[Any] | None = None) -> str:
        trial_id = str(trial.trial_id)
        if trial_id not in self._children:
            plan = self.given[trial_id]
            tags = {
                PARENT_TAG: self.start_parent(),
                TRIAL_TAG: trial_id,
                KIND_TAG: KIND_CONFIRM,
                CONFIRM_TAG: "true",
                CONFIRM_OF_TAG: plan.trial_id,
                SEED_TAG: str(plan.seed),
            }
            run = self.client.create_run(
                self.experiment_id, run_name=f"confirm-{plan.trial_id}-seed{plan.seed}", tags=tags
            )
            params = trial_params(trial.config)
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            self._children[trial_id] = run.info.run_id
        return self._children[trial_id]


def _trial_id(result: Any) -> str:
    """A Tune result's trial id (its folder's name when it never reported)."""
    found = (result.metrics or {}).get("trial_id")
    return str(found or Path(result.path).name.removeprefix("trial-"))


@dataclass
class ConfirmRunner:
    """Runs ``search.confirm`` after a search's trials (a no-op when it is off), then releases
    Ray either way.

    Args:
        trainable: the search's trainable.
        quiet: print nothing (no progress table either).
        release_ray: called once no more Tune fit follows (the search shuts its Ray down).
    """

    trainable: Callable[[dict[str, Any]], None]
    quiet: bool = False
    release_ray: Callable[[], None] | None = None

    def __call__(
        self, exp: Experiment, rows: list[Any], results: Any, callback: MlflowTrackingCallback,
        notes: list[str],
    ) -> Any:
        """Confirm the best configurations of ``rows`` (the search's
        :class:`search.summary.TrialRow` objects, reordered in place: the confirmed ones first,
        each with ``confirmed`` set).

        Returns:
            The row of the confirmed champion, or None (confirmation off, nothing to confirm,
            or no mean meets the rule): the caller picks by single trials then.
        """
        try:
            if exp.search.confirm is None:
                return None
            return self._confirm(exp, rows, results, callback, notes)
        except BaseException:
            callback.end_parent("FAILED")
            raise
        finally:
            if self.release_ray is not None:
                self.release_ray()

    def _confirm(
        self, exp: Experiment, rows: list[Any], results: Any, callback: MlflowTrackingCallback,
        notes: list[str],
    ) -> Any:
        c, s = exp.search.confirm, exp.search
        assert c is not None
        picked = top_configurations(s, rows, c.top_k)
        if not picked:
            return None
        configs = {_trial_id(r): r.config for r in results}
        plans = confirm_plans(picked, configs, c.seeds)
        if not self.quiet:
            print(
                f"adaptune search {exp.name}: confirming the best {len(picked)} "
                f"configuration(s) ({', '.join(picked)}) with {c.seeds} more seed(s) each: "
                f"{len(plans)} runs"
            )
        searcher = FixedConfigs(plans)
        tracking = ConfirmTrackingCallback(callback, searcher.given)
        stats = collect_stats(exp, rows, configs, searcher, self._fit(exp, searcher, tracking))
        rule = search_rule(s)
        winner = confirmed_winner(stats, rule, list(zip(s.metrics, s.modes, strict=False)))
        by_id = {r.trial_id: r for r in rows}
        for trial_id, st in stats.items():
            by_id[trial_id].confirmed = st
        order = ranked_trials(stats, winner)
        rows[:] = [by_id[t] for t in order] + [r for r in rows if r.trial_id not in stats]
        if winner is None:
            notes.append(
                f"confirmed over seeds: no configuration's means meet {str(rule)!r}; the "
                "champion is picked by single trials"
            )
            return None
        notes.append(confirm_note(stats, winner, picked[0]))
        log_confirmation(callback.client, callback.start_parent(), stats, winner)
        return by_id[winner]

    def _fit(
        self, exp: Experiment, searcher: FixedConfigs, callback: ConfirmTrackingCallback
    ) -> Any:
        from adaptune.search.tune_loop import patient_controller
        from adaptune.search.tuner import trial_resources
        from ray import tune
        from ray.tune.schedulers import FIFOScheduler
        from ray.tune.search import ConcurrencyLimiter

        s = exp.search
        metric = search_rule(s).metric
        reporter = tune.CLIReporter(
            parameter_columns={tune_key(n): n for n in dict.fromkeys(["seed", *exp.space])},
            metric_columns={"training_iteration": "tasks", metric: metric},
            max_report_frequency=30,
            max_column_length=14,
        )
        tuner = tune.Tuner(
            tune.with_resources(self.trainable, trial_resources(exp)),
            param_space={},  # every config comes whole from the searcher
            tune_config=tune.TuneConfig(
                metric=s.primary_metric,
                mode=s.primary_mode,
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
                scheduler=FIFOScheduler(),
                num_samples=len(searcher.plans),
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=CONFIRM_DIR,
                storage_path=search_location(exp),
                callbacks=[callback],
                # the champion is an original trial: a confirmation run's last task is enough
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                verbose=0 if self.quiet else 1,
                progress_reporter=reporter,
            ),
        )
        with patient_controller():
            return tuner.fit()


def collect_stats(
    exp: Experiment,
    rows: Sequence[Any],
    configs: Mapping[str, Mapping[str, Any]],
    searcher: FixedConfigs,
    results: Any,
) -> dict[str, ConfirmStats]:
    """Each confirmed configuration over its seeds: its original trial's final metrics, then
    those of each confirmation run that ran every task (``results``: the confirmation fit's).
    A plan that did not run every task (an error, or a fit stopped before it) is ``failed``.

    Args:
        exp: the experiment.
        rows: the search's summary rows.
        configs: trial id -> the config it trained with (its seed is the first of the table).
        searcher: the confirmation's :class:`FixedConfigs` (its plans, and which trial ran each).
        results: the confirmation fit's results.
    """
    T, s = len(exp.run.stream.tasks), exp.search
    rule = search_rule(s)
    by_id = {r.trial_id: r for r in rows}
    picked = list(dict.fromkeys(p.trial_id for p in searcher.plans))
    runs: dict[str, list[tuple[int, dict[str, float]]]] = {t: [] for t in picked}
    for r in results:
        plan = searcher.given.get(_trial_id(r))
        m = r.metrics or {}
        if plan is not None and not r.error and int(m.get("task_index", 0)) >= T:
            values = {k: float(v) for k, v in m.items() if _number(v)}
            runs[plan.trial_id].append((plan.seed, values))
    out = {}
    for t in picked:
        ordered = sorted(runs[t], key=lambda pair: pair[0])
        done = {x for x, _ in ordered}
        out[t] = ConfirmStats(
            trial_id=t,
            metric=rule.metric,
            mode=rule.mode,
            seeds=(int(get_hp(configs[t], "seed")), *done),
            runs=(final_values(s, by_id[t]), *(v for _, v in ordered)),
            failed=tuple(p.seed for p in searcher.plans if p.trial_id == t and p.seed not in done),
        )
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
