"""Per-task hyperparameter values: which settings may change between two tasks of one run, and
how the run applies the values of task k to what it already holds.

Two things change a setting in the middle of a run: ``run.schedule`` (one value per task, in
the experiment) and a Ray PBT exploit, which restarts a trial from another trial's checkpoint
with a new config. Both reach the run the same way: before task k it trains with
``config_for_task(cfg, k)``, and the values of that config, not those a restored optimizer
state carries, are the ones in force (:func:`set_optimizer_values`).

Example::

    run:
      schedule:
        lr: [1.0e-3, 5.0e-4, 2.0e-4]   # one value per task
        ewc_lambda: [0, 100, 100]
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adaptune.trainables.config import HYPERPARAMETERS, RunConfig
from adaptune.trainables.config_errors import format_validation_error
from adaptune.trainables.errors import ConfigError
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:  # the schema checks a schedule without torch (experiment-reading commands)
    import torch
    from adaptune.trainables.checkpoint import Progress
    from adaptune.trainables.components import Component

# The hyperparameters whose value may differ from one task to the next, each with why: the run
# reads them afresh for every task (or every step) and keeps no tensor whose shape or meaning
# they set. Left out, and why: seed (the RNGs are seeded once), buffer_kind, buffer_size and
# self_pool_size (a buffer's capacity and what its kept blocks are a sample of), ewc_mode (what
# the stored quadratic means: every task's term summed, or a decayed running one),
# update_mode, freeze_layers and the lora_* knobs (which weights exist and train: the model is
# built once), and the online-mode knobs (a schedule is refused in online mode; tasks mode
# ignores them).
MUTABLE: frozenset[str] = frozenset({
    # the optimizer's param groups get them before each task (set_optimizer_values)
    "lr",
    "weight_decay",
    # read at every step, or when a task's batch order and LR schedule are built afresh
    "batch_size",
    "epochs",
    "schedule",
    "warmup_frac",
    "grad_clip",
    # replay: the share of each batch drawn from the buffer, read per batch
    "replay_fraction",
    # EWC: the penalty weight (read per step), the online decay and the Fisher's sample count
    # (read at the next consolidation); the Fisher has the parameters' shapes whatever they are
    "ewc_lambda",
    "ewc_gamma",
    "fisher_samples",
    # distillation: read per step; the teacher is taken afresh at each task's start
    "distill_alpha",
    "temperature",
    # self-replay: the pool's share of each batch, and how the samples written before each task
    # are generated and filtered (they are packed into blocks of block_size whatever their length)
    "self_fraction",
    "gen_samples",
    "gen_temperature",
    "gen_top_p",
    "gen_max_tokens",
    "gen_prompt",
    "gen_prefix_tokens",
    "gen_min_tokens",
    "gen_overlap_n",
    "gen_max_overlap",
    "gen_ppl_min",
    "gen_ppl_max",
})


def config_for_task(cfg: RunConfig, k: int) -> RunConfig:
    """``cfg`` with the schedule's values for task ``k`` (1-based) applied; ``cfg`` itself when
    it has no schedule. The result keeps the schedule, so it describes the whole run too.

    Raises:
        ValueError: ``k`` is not a task of the stream.
    """
    if not cfg.schedule:
        return cfg
    n_tasks = len(cfg.stream.tasks)
    if not 1 <= k <= n_tasks:
        raise ValueError(f"`1 <= k <= {n_tasks}` must hold (the stream's tasks), but got k={k}")
    data = cfg.model_dump(mode="json")
    for name, values in cfg.schedule.items():
        _set(data, HYPERPARAMETERS[name], values[k - 1])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:  # the schema checked every task's values; kept for safety
        raise ConfigError(format_validation_error(err, prefix="run")) from None


def schedule_values(cfg: RunConfig) -> dict[str, Any]:
    """The value of every :data:`MUTABLE` hyperparameter in ``cfg``, in HYPERPARAMETERS order."""
    return {name: _get(cfg, name) for name in HYPERPARAMETERS if name in MUTABLE}


def check_schedule(
    fields: Mapping[str, Any], schedule: dict[str, list[Any]]
) -> dict[str, list[Any]]:
    """Check ``run.schedule`` against the rest of the run config (``fields``: the other fields
    of RunConfig, validated); returns it with each value in its field's type.

    Each value is checked by setting it into the config and validating that, alone and then
    together with the other values of its task, so every rule of the schema holds at every task.

    Raises:
        ValueError: one line per problem (the schema prefixes ``run.schedule``).
    """
    base = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
            for k, v in fields.items() if k != "schedule"}
    if set(RunConfig.model_fields) - {"schedule"} - set(base):
        return schedule  # a field failed: its own error is reported; values cannot be checked
    try:
        RunConfig.model_validate(base)
    except ValidationError:
        return schedule  # a rule across fields failed: reported by its own validator
    problems = _name_problems(base, schedule)
    if problems:
        raise ValueError("\n".join(problems))
    tasks = [t["name"] for t in base["stream"]["tasks"]]
    typed: dict[str, list[Any]] = {}
    for name, values in schedule.items():
        typed[name] = []
        for i, value in enumerate(values):
            try:
                typed[name].append(_get(_with(base, {name: value}), name))
            except ConfigError as err:
                problems.append(f"{name}[{i}] (task {i + 1}, {tasks[i]!r}): the value {value!r} "
                                f"is out of range: {err}")
    for k in range(1, len(tasks) + 1) if not problems else ():
        try:
            _with(base, {name: values[k - 1] for name, values in typed.items()})
        except ConfigError as err:
            problems.append(f"task {k} ({tasks[k - 1]!r}): its values together break a rule: "
                            f"{err}")
    if problems:
        raise ValueError("\n".join(problems))
    return typed


def _name_problems(base: dict[str, Any], schedule: dict[str, list[Any]]) -> list[str]:
    """Lines for a schedule in online mode, a name that may not change, a wrong length."""
    if base["stream"]["mode"] == "online":
        return ["per-task values need run.stream.mode `tasks`: online mode trains on chunks, "
                "not tasks, and keeps one config throughout (got mode `online`)"]
    valid = ", ".join(n for n in HYPERPARAMETERS if n in MUTABLE)
    tasks = [t["name"] for t in base["stream"]["tasks"]]
    problems = []
    for name, values in schedule.items():
        if name not in HYPERPARAMETERS:
            near = difflib.get_close_matches(name, sorted(MUTABLE), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{name!r} is not a hyperparameter{hint}; valid names: {valid}")
        elif name not in MUTABLE:
            problems.append(f"{name!r} cannot change between tasks (it sets the model, a "
                            f"buffer's size or the RNGs, built once per run); valid names: {valid}")
        elif len(values) != len(tasks):
            problems.append(f"{name}: must hold one value per task, {len(tasks)} "
                            f"({', '.join(tasks)}), but got {len(values)}")
    return problems


def _with(base: dict[str, Any], values: dict[str, Any]) -> RunConfig:
    """``base`` with ``values`` set, validated (without a schedule)."""
    data = copy.deepcopy(base)
    for name, value in values.items():
        _set(data, HYPERPARAMETERS[name], value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix="run")) from None


def set_optimizer_values(opt: torch.optim.Optimizer, cfg: RunConfig) -> None:
    """Write ``cfg``'s lr and weight_decay into every param group of ``opt``.

    Called after a checkpoint's optimizer state is loaded (``load_state_dict`` puts back the
    groups' values of the run that wrote it: a PBT exploit restarts from another trial's
    checkpoint with a perturbed lr, which would otherwise be silently ignored) and before each
    task (a schedule). ``initial_lr`` too: each task's LambdaLR takes its base lr from it, and
    torch sets it only where it is absent (``setdefault``), so the first value would stay.
    """
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] = cfg.optim.lr
        group["weight_decay"] = cfg.optim.weight_decay


def carry_components(
    comps: Mapping[str, Component], before: RunConfig, cfg: RunConfig
) -> dict[str, Component]:
    """The components ``cfg`` switches on, built from its settings, each with the state of the
    one of ``comps`` (built from ``before``) of the same name; ``comps`` themselves when the
    settings did not change. A component switched off for a task drops its state (a
    checkpoint written then holds none), so a resumed run and an uninterrupted one agree."""
    from adaptune.trainables.components import build_components

    if cfg.components == before.components:
        return dict(comps)
    built = build_components(cfg.components)
    for name, comp in built.items():
        if name in comps:
            comp.load_state_dict(comps[name].state_dict())
    return built


def record_task(progress: Progress, cfg: RunConfig, k: int, trial_id: str | None) -> None:
    """Note in ``progress`` that task ``k`` was trained with ``cfg`` by ``trial_id``: the
    config in force, and one history entry (entries of later tasks, from a checkpoint of a
    longer run, are dropped first)."""
    progress.config = cfg.model_dump(mode="json")
    entry = {"task": k, "trial": trial_id, "hp": schedule_values(cfg)}
    progress.history = [h for h in progress.history if h["task"] < k] + [entry]


def history_metrics(progress: Progress, cfg: RunConfig, trial_id: str | None) -> dict[str, Any]:
    """What a task's report adds: ``lineage``, the trial that trained each task so far
    (``"a1,a1,b7"``: a PBT exploit cloned a1's checkpoint into b7), when the trial is known,
    and ``hp/<name>`` for each scheduled name, with the value the task trained with."""
    out: dict[str, Any] = {}
    if trial_id is not None:
        out["lineage"] = ",".join(str(h["trial"] or "-") for h in progress.history)
    for name in cfg.schedule or {}:
        out[f"hp/{name}"] = _get(cfg, name)
    return out


def _get(cfg: RunConfig, name: str) -> Any:
    node: Any = cfg
    for part in HYPERPARAMETERS[name]:
        node = getattr(node, part)
    return node


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value
