"""What a search refuses before anything starts: objective, mode, scheduler, space, its folder.

Every refusal is one :class:`ConfigError` line naming the field, the rule and the valid values.
"""

from __future__ import annotations

import difflib
from typing import Any

from adaptune.search.confirm import confirm_problems
from adaptune.search.experiment import Experiment, experiment_yaml
from adaptune.search.locations import search_location
from adaptune.search.pbt import is_population, mutated_names, population_problems
from adaptune.search.records import experiment_hash
from adaptune.search.resume import check_search_dir, inspect_search_dir
from adaptune.search.select import check_rule, parse_rule
from adaptune.search.stores import check_tracking_server
from adaptune.search.warm import warm_start_problems
from adaptune.spaces import Dist
from adaptune.spaces.paths import set_hp
from adaptune.trainables.config import RunConfig
from adaptune.trainables.config_errors import format_validation_error
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.metrics import Direction, objectives
from pydantic import ValidationError


def objective_metrics(exp: Experiment) -> dict[str, Direction]:
    """Metrics a search of ``exp`` may optimise, with their better direction
    (:func:`trainables.metrics.objectives` for its stream)."""
    stream = exp.run.stream
    return objectives(
        [t.name for t in stream.tasks],
        pretrain=exp.run.model.pretrain is not None,
        retain_names=[r.name for r in stream.retain],
        online=stream.mode == "online",
    )


def check_search(exp: Experiment, *, resume: bool = False, folder: bool = True) -> None:
    """Refuse a search that cannot work, before anything starts or is written.

    Args:
        exp: the experiment.
        resume: continue the interrupted search in ``<storage_path>/<name>`` instead of
            starting one there (see :mod:`search.resume`).
        folder: check the search folder too (:func:`check_search_folder`); a caller that
            checks data and model first passes False and checks the folder after them.

    Raises:
        ConfigError: one line per problem found (objective, scheduler, space), naming the
            field, the rule and the valid values; then the tracking server; then, for the
            search directory, what it holds and whether ``--resume`` or ``--name`` applies.
    """
    problems = search_problems(exp)
    if problems:
        raise ConfigError("\n".join(problems))
    check_tracking_server(exp.tracking.tracking_uri)
    if folder:
        check_search_folder(exp, resume=resume)


def search_problems(exp: Experiment) -> list[str]:
    """Every problem of the search settings, one line each (objective, mode, scheduler, space)."""
    problems: list[str] = []
    s, T = exp.search, len(exp.run.stream.tasks)
    for check in (check_objective, check_space_bounds):
        try:
            check(exp)
        except ConfigError as err:
            problems.extend(str(err).splitlines())
    if s.scheduler == "asha" and not is_population(exp) and s.grace_period > T:
        problems.append(
            f"search.grace_period: must be <= the number of tasks ({T}), ASHA's max_t "
            f"(got {s.grace_period})"
        )
    if is_population(exp):  # what PBT/PB2 need, an empty space included (search/pbt.py)
        problems += population_problems(exp)
    elif not any(isinstance(v, Dist) for v in exp.space.values()):
        problems.append(
            "space: nothing to search; give at least one distribution "
            "(loguniform, uniform, int, choice) or use `adaptune train`"
        )
    problems += _scheduled_and_searched(exp)
    problems += warm_start_problems(exp)  # the settings; the earlier search is read later
    problems += confirm_problems(exp)  # search.confirm (search/confirm.py)
    return problems


def _scheduled_and_searched(exp: Experiment) -> list[str]:
    """A hyperparameter searched in ``space`` must not be in ``run.schedule`` too: the schedule's
    value replaces the sampled one at every task, so every trial would train alike. PBT/PB2's
    mutated names are refused by :func:`search.pbt.population_problems` already."""
    scheduled = exp.run.schedule or {}
    mutated = set(mutated_names(exp)) if is_population(exp) else set()
    return [
        f"space.{name}: searched, but run.schedule.{name} also sets it; a scheduled value "
        f"replaces the searched one at every task, so the search would vary nothing; drop "
        f"space.{name} to train with the schedule, or run.schedule.{name} to search {name}"
        for name, spec in exp.space.items()
        if isinstance(spec, Dist) and name in scheduled and name not in mutated
    ]


def check_search_folder(exp: Experiment, *, resume: bool = False) -> None:
    """The search folder ``<storage_path>/<name>`` must fit ``resume`` (no name clash).

    Raises:
        ConfigError: what the folder holds and whether ``--resume`` or ``--name`` applies.
    """
    check_search_dir(
        inspect_search_dir(search_location(exp)),
        name=exp.name,
        resume=resume,
        experiment_hash=experiment_hash(experiment_yaml(exp)),
    )


def selectable_metrics(exp: Experiment) -> dict[str, Direction]:
    """Metrics a multi-objective list or a selection rule may name, with their better
    direction: the objectives, and ``forgetting``, which is 0 after task 1 and so never an
    objective alone, but a fair second objective or constraint."""
    return {**objective_metrics(exp), "forgetting": "min"}


def check_objective(exp: Experiment) -> None:
    """``search.metric`` must be an objective the trainable reports (a list: each one, once),
    ``search.mode`` its better direction (a list: one per metric), ``search.prune_metric`` one
    of them that a scheduler can stop trials on, ``search.select`` a rule that parses and
    names metrics the trainable reports (:mod:`search.select`).

    Raises:
        ConfigError: one line per problem: the valid metrics (with a near match), the mode
            that fits, or the rule's grammar.
    """
    s = exp.search
    problems: list[str] = []
    if len(s.metrics) != len(s.modes):
        problems.append(
            f"search.mode: give one mode per metric of search.metric ({len(s.metrics)} "
            f"metric(s), got {len(s.modes)} mode(s): {s.mode!r}); leave it out to take each "
            "metric's better direction"
        )
    allowed = selectable_metrics(exp) if s.multi_objective else objective_metrics(exp)
    for i, metric in enumerate(s.metrics):
        if metric in s.metrics[:i]:
            problems.append(f"search.metric: {metric!r} appears twice; name each objective once")
        elif metric not in allowed:
            problems.append(_unknown_objective(metric, allowed))
        elif i < len(s.modes) and s.modes[i] != allowed[metric]:
            better = allowed[metric]
            problems.append(
                f"search.mode: {metric} is better when "
                f"{'lower' if better == 'min' else 'higher'}, so {'its ' * s.multi_objective}"
                f"mode must be {better!r} (got {s.modes[i]!r}; leave it out to take the "
                "metric's)"
            )
    problems += _prune_problems(exp) + _select_problems(exp)
    if problems:
        raise ConfigError("\n".join(problems))


def _unknown_objective(metric: str, allowed: dict[str, Direction]) -> str:
    near = difflib.get_close_matches(metric, list(allowed), n=1)
    if metric.startswith("forgetting"):
        hint = " (it is 0 after task 1; use stream_loss, or a list: [new_task_loss, forgetting])"
    else:
        hint = f" (did you mean {near[0]!r}?)" if near else ""
    return (
        f"search.metric: {metric!r} is not an objective the trainable reports{hint}; "
        f"valid values: {', '.join(allowed)}"
    )


def _prune_problems(exp: Experiment) -> list[str]:
    """``search.prune_metric`` must be one of the objectives, and not ``forgetting`` for ASHA
    (every trial ties at task 1). PBT takes one objective only (:mod:`search.pbt`)."""
    s = exp.search
    if s.prune_metric is not None and s.prune_metric not in s.metrics:
        return [
            f"search.prune_metric: {s.prune_metric!r} must be one of search.metric "
            f"({', '.join(s.metrics)})"
        ]
    asha = s.scheduler == "asha" and s.algorithm in ("tpe", "random")
    if asha and s.multi_objective and s.primary_metric == "forgetting":
        others = [m for m in s.metrics if m != "forgetting"]
        return [
            "search.prune_metric: ASHA cannot stop trials on forgetting (0 after task 1, every "
            f"trial ties there); set search.prune_metric to one of {', '.join(others)} or "
            "search.scheduler: fifo"
        ]
    return []


def _select_problems(exp: Experiment) -> list[str]:
    """``search.select`` must parse and name metrics the trainable reports."""
    if exp.search.select is None:
        return []
    try:
        check_rule(parse_rule(exp.search.select), selectable_metrics(exp))
    except ValueError as err:
        return [f"search.select: {err}"]
    return []


def check_space_bounds(exp: Experiment) -> None:
    """Every extreme value of every distribution must pass the run schema (lr <= 1, ...).

    Raises:
        ConfigError: ``space.<name>: the value V is out of range: <the run schema's rule>``,
            one line per value out of range.
    """
    base = exp.run.model_dump(mode="json")
    problems: list[str] = []
    for name, spec in exp.space.items():
        values = list(spec.values()) if isinstance(spec, Dist) else [spec]
        for value in values:
            try:
                _check_value(base, name, value)
            except ConfigError as err:
                problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(problems))


def _check_value(base: dict[str, Any], name: str, value: Any) -> None:
    import copy

    data = copy.deepcopy(base)
    set_hp(data, name, value)
    try:
        RunConfig.model_validate(data)
    except ValidationError as err:
        rule = format_validation_error(err, prefix="run")
        raise ConfigError(f"space.{name}: the value {value!r} is out of range: {rule}") from None
