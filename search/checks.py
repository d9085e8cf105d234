"""What a search refuses before anything starts: objective, mode, scheduler, space, its folder.

Every refusal is one :class:`ConfigError` line naming the field, the rule and the valid values.
"""

from __future__ import annotations

import difflib
from typing import Any

from adaptune.search.experiment import Experiment, experiment_yaml
from adaptune.search.locations import search_location
from adaptune.search.records import experiment_hash
from adaptune.search.resume import check_search_dir, inspect_search_dir
from adaptune.search.stores import check_tracking_server
from adaptune.spaces import Dist
from adaptune.spaces.paths import set_hp
from adaptune.trainables.config import RunConfig, format_validation_error
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
    if s.scheduler == "asha" and s.grace_period > T:
        problems.append(
            f"search.grace_period: must be <= the number of tasks ({T}), ASHA's max_t "
            f"(got {s.grace_period})"
        )
    if not any(isinstance(v, Dist) for v in exp.space.values()):
        problems.append(
            "space: nothing to search; give at least one distribution "
            "(loguniform, uniform, int, choice) or use `adaptune train`"
        )
    return problems


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


def check_objective(exp: Experiment) -> None:
    """``search.metric`` must be an objective the trainable reports, ``search.mode`` its
    better direction.

    Raises:
        ConfigError: one line: the valid metrics (with a near match), or the mode that fits.
    """
    s = exp.search
    allowed = objective_metrics(exp)
    if s.metric not in allowed:
        near = difflib.get_close_matches(s.metric, list(allowed), n=1)
        if s.metric.startswith("forgetting"):
            hint = " (it is 0 after task 1; use stream_loss)"
        else:
            hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"search.metric: {s.metric!r} is not an objective the trainable reports{hint}; "
            f"valid values: {', '.join(allowed)}"
        )
    better = allowed[s.metric]
    if s.mode != better:
        raise ConfigError(
            f"search.mode: {s.metric} is better when "
            f"{'lower' if better == 'min' else 'higher'}, so mode must be {better!r} "
            f"(got {s.mode!r}; leave it out to take the metric's)"
        )


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
