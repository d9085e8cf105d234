"""Space specs -> Ray Tune domains, the Tune ``param_space``, and named presets.

``build_param_space(exp)`` is the one nested dict Ray hands every trial: the experiment's run
config with each searched hyperparameter's leaf replaced by a Tune domain. OptunaSearch converts
those domains to Optuna distributions (inclusive integer bounds survive the round trip:
``tune.randint(low, high + 1)`` becomes ``IntDistribution(low, high)``).

Example:
    >>> to_tune(Dist(loguniform=(1e-4, 1e-2)))  # doctest: +ELLIPSIS
    <ray.tune.search.sample.Float object at ...>
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptune.spaces import Dist, Spec, check_space
from adaptune.spaces.paths import set_hp
from adaptune.spaces.presets import PRESETS  # noqa: F401  (re-exported)
from adaptune.trainables.config_paths import with_absolute_paths


def to_tune(spec: Spec) -> Any:
    """One parsed space entry as a Ray Tune domain (a fixed value stays as it is).

    Args:
        spec: a :class:`spaces.Dist` or a fixed value, as returned by :func:`spaces.check_space`.

    Returns:
        ``tune.loguniform`` / ``tune.uniform`` / ``tune.randint`` (inclusive ``high``) /
        ``tune.choice``, or the fixed value.
    """
    from ray import tune

    if not isinstance(spec, Dist):
        return spec
    values = spec.values()
    if spec.kind == "loguniform":
        return tune.loguniform(float(values[0]), float(values[1]))
    if spec.kind == "uniform":
        return tune.uniform(float(values[0]), float(values[1]))
    if spec.kind == "int":
        return tune.randint(int(values[0]), int(values[1]) + 1)  # Tune's high is exclusive
    return tune.choice(list(values))


def parse_space(space: dict[str, Any]) -> dict[str, Spec]:
    """Like :func:`spaces.check_space`, but entries already parsed (``Experiment.space``) pass."""
    raw = {k: v for k, v in space.items() if not isinstance(v, Dist)}
    parsed = check_space(raw)
    return {k: v if isinstance(v, Dist) else parsed[k] for k, v in space.items()}


def space_to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """A whole space (raw YAML or parsed) as ``{name: Tune domain or value}``."""
    return {name: to_tune(spec) for name, spec in parse_space(space).items()}


def build_param_space(exp: Any) -> dict[str, Any]:
    """The run config as a nested plain dict with each searched leaf replaced by its domain.

    Args:
        exp: a :class:`search.experiment.Experiment` (anything with ``run`` and a parsed
            ``space``, as :func:`spaces.check_space` returns it).

    Returns:
        ``exp.run.model_dump(mode="json")`` with ``HYPERPARAMETERS[name]`` set for every space key.
    """
    # Trials run in their own folders: relative data/model/cache paths are fixed here.
    run = with_absolute_paths(exp.run, Path.cwd())
    params: dict[str, Any] = run.model_dump(mode="json")
    for name, spec in exp.space.items():
        set_hp(params, name, to_tune(spec))
    return params


def searched_names(space: dict[str, Any]) -> list[str]:
    """Names of the space keys that are distributions (fixed values are not searched)."""
    return [name for name, spec in parse_space(space).items() if isinstance(spec, Dist)]
