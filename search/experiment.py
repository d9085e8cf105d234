"""The experiment file: a run config plus what to search and where to record it.

``load_experiment(path)`` reads YAML with a safe loader (duplicate keys rejected), applies
``--set`` overrides in one place, and returns a frozen, strictly validated :class:`Experiment`.
Every problem becomes one :class:`ConfigError` line: ``file: field.path: rule (got value)``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from adaptune.search.stores import DEFAULT_TRACKING_URI
from adaptune.spaces import check_space
from adaptune.spaces.paths import set_path
from adaptune.trainables.config import HYPERPARAMETERS, RunConfig
from adaptune.trainables.config_errors import format_validation_errors, register_schema
from adaptune.trainables.config_paths import with_local_inputs
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.metrics import direction
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PBTConfig(_Strict):
    """Population Based Training at task boundaries (``search.algorithm: pbt`` or ``pb2``)."""

    perturbation_interval: int = Field(1, ge=1)  # tasks between two exploit/explore rounds
    # the bottom fraction of the population copies a trial of the top fraction
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    # pbt: chance that a mutated value is drawn afresh from the space instead of perturbed
    resample_probability: float = Field(0.25, ge=0, le=1)
    # the hyperparameters PBT may change mid-stream; default: every searched one that can
    mutate: list[str] | None = None


class ConfirmConfig(_Strict):
    """Re-run the best configurations with more seeds; the champion is the best mean
    (:mod:`search.confirm`)."""

    top_k: int = Field(3, ge=1)  # configurations re-run: the best by the selection rule
    seeds: int = Field(3, ge=1)  # further seeds each: the trial's seed + 1 .. + seeds


Objective = Literal["min", "max"]


class SearchConfig(_Strict):
    num_samples: int = Field(12, ge=1)  # trials to run (pbt: the population)
    max_concurrent: int = Field(2, ge=1)  # trials at once
    seed: int = 0  # the searcher's seed
    algorithm: Literal["tpe", "random", "pbt", "pb2"] = "tpe"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # tasks before ASHA may stop a trial
    reduction_factor: float = Field(2.0, gt=1)
    time_budget_s: float | None = Field(None, gt=0)
    # the objective, a metric the trainable reports; a list: a multi-objective search
    metric: str | list[str] = "stream_loss"
    # default: the metric's better direction; a search refuses a mode against it
    mode: Objective | list[Objective] = "min"
    # multi-objective: the metric ASHA stops trials on (default: the first of `metric`)
    prune_metric: str | None = None
    # the champion among the trials that ran every task, e.g.
    # "min new_task_loss where forgetting <= 0.1"; default: the best `metric` (the first)
    select: str | None = None
    # an earlier search (its name or its MLflow parent run id) whose finished trials inside
    # this space seed the study; warm_start_enqueue: its best k configurations run first
    warm_start: str | None = None
    warm_start_enqueue: int = Field(0, ge=0)
    pbt: PBTConfig = PBTConfig()
    # after the trials: the best top_k configurations run again with `seeds` more seeds each
    confirm: ConfirmConfig | None = None
    # Ray retries a failed trial from its last checkpoint this many times. Ray counts every
    # failure, so a divergence fails again on each retry (resumed with the same RNG state; it
    # costs at most one task); no -1 (Ray's "forever"), which would loop on such a trial.
    max_failures: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _mode_from_metric(cls, data: Any) -> Any:
        """An absent ``mode`` is the metric's better direction (``bwt``: max), per metric for
        a list. An unknown metric keeps the default; the search refuses the metric itself.
        A one-item list is that metric (a single-objective search)."""
        if isinstance(data, dict):
            data = {
                k: v[0] if k in ("metric", "mode") and isinstance(v, list) and len(v) == 1 else v
                for k, v in data.items()
            }
        if isinstance(data, dict) and data.get("mode") is None:
            metric = data.get("metric", cls.model_fields["metric"].default)
            if isinstance(metric, str):
                better = direction(metric)
                if better is not None:
                    data = {**data, "mode": better}
            elif isinstance(metric, list):
                modes = [direction(m) if isinstance(m, str) else None for m in metric]
                data = {**data, "mode": [m or "min" for m in modes]}
        return data

    @property
    def metrics(self) -> list[str]:
        """Every objective, in order (one for a single-objective search)."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        """Each objective's mode, in the order of :attr:`metrics`."""
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def primary_metric(self) -> str:
        """The one metric a scheduler (ASHA, PBT) and the summary's order follow."""
        return self.prune_metric or self.metrics[0]

    @property
    def primary_mode(self) -> str:
        metrics = self.metrics
        m = self.primary_metric
        return self.modes[metrics.index(m)] if m in metrics else self.modes[0]


class ResourcesConfig(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    # 0.25: four trials share one GPU. Ray can give a trial part of one GPU or whole GPUs, not
    # 1.5 (such a trial would wait forever), and counts in steps of 0.0001.
    gpus_per_trial: float = Field(0.0, ge=0)

    @field_validator("gpus_per_trial")
    @classmethod
    def _gpu_share(cls, value: float) -> float:
        if value and not (1e-4 <= value <= 1 or float(value).is_integer()):
            raise ValueError(
                "must be 0, a share of one GPU in [0.0001, 1] or a whole number of GPUs"
            )
        return value


class TrackingConfig(_Strict):
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment_name: str | None = None  # default: the experiment's name
    registered_model_name: str | None = None  # default: "adaptune-<name>"


class Experiment(_Strict):
    """A runnable experiment. ``run`` holds a value for every hyperparameter; ``space`` says
    which of them a search varies (``adaptune train`` ignores ``space``)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    run: RunConfig
    # name -> Dist or a fixed value: parsed here, once (presets expanded); used as it is
    space: dict[str, Any] = Field(default_factory=dict)
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage_path: str = "runs/ray"  # Ray results; shared storage (NFS, S3 URI) on a cluster

    @field_validator("space")
    @classmethod
    def _space(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_space(value)


register_schema(Experiment)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one, and
    reads ``3e-4`` and ``1e5`` as numbers (YAML 1.2; PyYAML's YAML 1.1 wants ``3.0e-4``)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        keys.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)
# YAML 1.2's float: an exponent without a dot (`3e-4`, `1e5`); ints stay ints (`1_000`, `16`).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml_text(text: str) -> Any:
    """Parse YAML text with the experiment file's rules (duplicate keys refused, ``3e-4`` a
    number).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping safely. Raises ConfigError with the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: experiment file not found")
    try:
        data = parse_yaml_text(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML: {where}{problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the file must hold a YAML mapping (got {type(data).__name__})")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides; ``key`` is a hyperparameter name (``lr``) or a dotted
    path (``run.stream.max_train_tokens``); ``value`` is parsed as YAML (``3e-4`` a number).

    A hyperparameter the space searches (``lr`` in ``space``, or a preset) is pinned: the
    value goes into ``run`` and into ``space`` as a fixed value, so this search does not vary it.

    Raises:
        ConfigError: one line naming the ``--set`` item: no ``=``, invalid YAML, or a path
            through something other than a mapping.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = parse_yaml_text(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {problem}") from None
        path = ("run", *HYPERPARAMETERS[key]) if key in HYPERPARAMETERS else tuple(key.split("."))
        try:
            set_path(data, path, value)
            space = data.get("space")
            if key in HYPERPARAMETERS and isinstance(space, dict) and (
                key in space or "preset" in space
            ):
                space[key] = value
        except TypeError as err:
            raise ConfigError(f"--set {item!r}: {err}") from None
    return data


def pinned_by_overrides(exp: Experiment, overrides: list[str]) -> dict[str, Any]:
    """The hyperparameters that ``overrides`` fixed in the space: name -> value."""
    names = {item.partition("=")[0] for item in overrides}
    return {
        n: exp.space[n] for n in HYPERPARAMETERS if n in names and n in exp.space
    }


def parse_experiment(data: dict[str, Any], source: str = "<experiment>") -> Experiment:
    """Validate an experiment mapping.

    Raises:
        ConfigError: one line per error (every error of the mapping, not only the first).
    """
    try:
        return Experiment.model_validate(data)
    except ValidationError as err:
        raise ConfigError("\n".join(format_validation_errors(err, source=source))) from None
    except ValueError as err:  # from check_space, outside pydantic's wrapping
        raise ConfigError(f"{source}: space: {err}") from None


def load_experiment(
    path: str | Path, overrides: list[str] | None = None, *, search_name: str | None = None
) -> Experiment:
    """Read, override and validate an experiment file.

    Relative input paths in ``run`` (data files, local model, tokenizer and dataset folders)
    are resolved against the file's folder.

    Args:
        path: the experiment YAML file.
        overrides: ``--set KEY=VALUE`` items (:func:`apply_overrides`).
        search_name: ``--name``: names this search (Ray folder, Optuna study, parent run)
            instead of the file's ``name``; the MLflow experiment and the registered model
            keep the file's name unless ``tracking`` names them.

    Raises:
        ConfigError: one line per error, naming the file, the field, the rule and the valid
            values.

    Example:
        >>> exp = load_experiment("experiments/quickstart.yaml", ["lr=3e-4"])
        >>> exp.run.optim.lr
        0.0003
    """
    data = apply_overrides(read_yaml(path), overrides or [])
    if search_name is not None:
        data = with_search_name(data, search_name)
    exp = parse_experiment(data, source=str(path))
    run = with_local_inputs(exp.run, Path(path).resolve().parent)
    return exp.model_copy(update={"run": run}) if run != exp.run else exp


def default_model_name(name: str) -> str:
    """The registered model a search's champion goes to unless ``tracking`` names one."""
    return f"adaptune-{name}"


def with_search_name(data: dict[str, Any], search_name: str) -> dict[str, Any]:
    """``data`` renamed to ``search_name``, its MLflow experiment and registered model left
    under the file's ``name`` (so every search of one file lands in one MLflow experiment)."""
    data = dict(data)
    base = data.get("name")
    tracking = data.get("tracking")
    if isinstance(base, str) and (tracking is None or isinstance(tracking, dict)):
        tracking = dict(tracking or {})
        if tracking.get("experiment_name") is None:
            tracking["experiment_name"] = base
        if tracking.get("registered_model_name") is None:
            tracking["registered_model_name"] = default_model_name(base)
        data["tracking"] = tracking
    data["name"] = search_name
    return data


def experiment_yaml(exp: Experiment) -> str:
    """The experiment as YAML, defaults included (the form ``best.yaml`` is written in)."""
    return yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True), sort_keys=False)
