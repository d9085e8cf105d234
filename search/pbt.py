"""Population Based Training along the task stream: ``search.algorithm: pbt`` or ``pb2``.

A population of ``search.num_samples`` trials starts from values drawn from the space (Tune's
seeded ``BasicVariantGenerator``: Ray refuses a searcher beside PBT, so there is no Optuna
study). Every ``search.pbt.perturbation_interval`` tasks, once every live trial has finished
that task (synchronous PBT: stream_loss after task 1 and after task 2 are not comparable, so
trials are ranked at the same task), the bottom ``quantile_fraction`` of the population copies
a trial of the top: its checkpoint (weights, optimizer state, components, RNGs) and its whole
config, then changes the mutated hyperparameters. ``pbt`` multiplies each number by 0.8 or 1.2
(a choice moves to a neighbouring value) or, with ``resample_probability``, draws it afresh;
``pb2`` (Ray's PB2) picks the new values with a GP bandit fitted to the population's progress.
The donor and the new values are drawn from a stream seeded by ``search.seed``
(:mod:`search.pbt_scheduler`). The trial resumes from the copy with the new values in force
(:func:`adaptune.trainables.schedule.set_optimizer_values`).

Mutated: the searched hyperparameters that may change between tasks
(:data:`adaptune.trainables.schedule.MUTABLE`), or those of them in ``search.pbt.mutate``. The
other searched values are drawn once per trial and change only when the trial copies a donor.

Each checkpoint's ``progress.json`` keeps who trained each task with which values (its
``history``, inherited from the donor); the MLflow callback copies the final one into the
trial's run as ``lineage.json``, and ``adaptune export`` turns the winner's into ``run.schedule``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptune.search.experiment import Experiment
from adaptune.search.locations import local_results_dir
from adaptune.search.tags import DONORS_TAG, LINEAGE_TAG
from adaptune.spaces import Dist
from adaptune.spaces.paths import get_hp, set_hp
from adaptune.trainables.config import HYPERPARAMETERS
from adaptune.trainables.errors import ConfigError

POPULATION = ("pbt", "pb2")  # the search algorithms that evolve a population
LINEAGE_ARTIFACT = "lineage.json"  # on a trial's run: its final checkpoint's history
POLICY_LOG = "pbt_global.txt"  # Ray's log of every exploit (PB2 writes the same file)
PB2_INSTALL = "pip install 'adaptune[pb2]'"  # scikit-learn, which Ray's PB2 imports


def is_population(exp: Experiment) -> bool:
    """Whether ``exp`` searches with PBT or PB2."""
    return exp.search.algorithm in POPULATION


def _mutable() -> frozenset[str]:
    # imported here: trainables.schedule loads torch, which the checks, the dry run and
    # `adaptune export` otherwise do without
    from adaptune.trainables.schedule import MUTABLE

    return MUTABLE


def searched_names(exp: Experiment) -> list[str]:
    """The space's distributions (fixed values are not searched), in the space's order."""
    return [name for name, spec in exp.space.items() if isinstance(spec, Dist)]


def mutated_names(exp: Experiment) -> list[str]:
    """What PBT changes between tasks: the searched names that may change
    (:data:`~adaptune.trainables.schedule.MUTABLE`), limited to ``search.pbt.mutate`` if given."""
    chosen, mutable = exp.search.pbt.mutate, _mutable()
    return [n for n in searched_names(exp) if n in mutable and (chosen is None or n in chosen)]


# -- checks -----------------------------------------------------------------------------------
def population_problems(exp: Experiment) -> list[str]:
    """Every reason ``exp`` cannot run as a PBT/PB2 search, one line each (none for another
    algorithm): nothing it may mutate, a bad ``search.pbt.mutate``, a population under 2, no
    perturbation before the last task, an online stream, several objectives, and for PB2 a
    choice to mutate or scikit-learn missing (a warm start: :mod:`search.warm`)."""
    if not is_population(exp):
        return []
    problems = _space_problems(exp)
    s, algo, T = exp.search, exp.search.algorithm, len(exp.run.stream.tasks)
    if s.num_samples < 2:
        problems.append(
            f"search.num_samples: {algo} needs a population of at least 2 trials, which copy "
            f"each other (got {s.num_samples})"
        )
    if s.pbt.perturbation_interval >= T:
        problems.append(
            f"search.pbt.perturbation_interval: must be < the number of tasks ({T}): trials "
            f"copy each other after a task that is not the last "
            f"(got {s.pbt.perturbation_interval})"
        )
    if exp.run.stream.mode == "online":
        problems.append(
            f"run.stream.mode: {algo} needs mode 'tasks': an online run keeps one config "
            "throughout, so a copied trial could not take new values (got 'online')"
        )
    if s.multi_objective:
        problems.append(
            f"search.metric: {algo} ranks its population by one metric; give one (got "
            f"{s.metrics}); several objectives need algorithm tpe or random"
        )
    return problems + _pb2_problems(exp)


def _space_problems(exp: Experiment) -> list[str]:
    """Something to mutate: a searched name that may change between tasks, ``mutate`` naming
    only such names, none of them also in ``run.schedule``."""
    algo, mutate = exp.search.algorithm, exp.search.pbt.mutate
    mutable = _mutable()
    searched = searched_names(exp)
    candidates = [n for n in searched if n in mutable]
    valid = ", ".join(n for n in HYPERPARAMETERS if n in mutable)  # the run's order
    if not candidates:
        got = f"searched: {', '.join(searched)}" if searched else "nothing searched"
        return [
            f"space: {algo} changes hyperparameters between tasks, so search at least one "
            f"that may change (a distribution); valid names: {valid} ({got})"
        ]
    problems = []
    if mutate is not None:
        bad = [n for n in mutate if n not in candidates]
        if bad or not mutate:
            problems.append(
                f"search.pbt.mutate: must name searched hyperparameters that may change "
                f"between tasks; valid values: {', '.join(candidates)} (got {mutate}); leave "
                "it out to mutate all of them"
            )
    scheduled = sorted(set(exp.run.schedule or {}) & set(mutated_names(exp)))
    if scheduled:
        problems.append(
            f"run.schedule: {', '.join(scheduled)} is mutated by {algo}, whose values the "
            "schedule would override; leave it out of run.schedule or of search.pbt.mutate"
        )
    return problems


def _pb2_problems(exp: Experiment) -> list[str]:
    if exp.search.algorithm != "pb2":
        return []
    problems = [
        f"space.{n}: pb2 models numeric ranges only (loguniform, uniform, int), not choice; "
        f"use search.algorithm pbt, or leave {n} out of search.pbt.mutate"
        for n in mutated_names(exp)
        if exp.space[n].kind == "choice"
    ]
    if importlib.util.find_spec("sklearn") is None:
        problems.append(
            f"search.algorithm: pb2 needs scikit-learn, which is not installed; {PB2_INSTALL}"
        )
    return problems


# -- Ray Tune ---------------------------------------------------------------------------------
def checkpoints_to_keep(exp: Experiment) -> int:
    """``CheckpointConfig.num_to_keep``: 1, except in a population search.

    A trial that copies a donor restores the checkpoint the donor reported at the perturbation;
    until then (it may wait for a free CPU) the donor goes on, at most ``perturbation_interval``
    tasks before it waits at the next perturbation, and deletes its oldest checkpoint at each
    new one beyond ``num_to_keep``. Keeping interval + 2 (one spare for a copy that starts while
    the donor reports) means the copied checkpoint is never gone; Ray warns at 2 or fewer.
    """
    if not is_population(exp):
        return 1
    return max(3, exp.search.pbt.perturbation_interval + 2)


class KeepInSpace:
    """PBT's ``custom_explore_fn``: puts each mutated number back inside its distribution.

    Ray perturbs a number by x0.8 or x1.2 with no regard for its range: an lr at the top of
    its range would leave it, and a fraction could break the run schema (trial ERROR).

    Args:
        bounds: hyperparameter name -> (kind, low, high) of its distribution.
    """

    def __init__(self, bounds: dict[str, tuple[str, float, float]]) -> None:
        self.bounds = bounds

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for name, (kind, low, high) in self.bounds.items():
            value = min(max(get_hp(config, name), low), high)
            set_hp(config, name, int(round(value)) if kind == "int" else float(value))
        return config


def build_population_scheduler(exp: Experiment) -> Any:
    """Ray's synchronous ``PopulationBasedTraining`` (or ``PB2``) at task boundaries, drawing
    from its own stream seeded by ``search.seed`` (:mod:`search.pbt_scheduler`).

    ``time_attr`` is ``task_index`` (what every report carries); metric and mode come from
    ``TuneConfig`` (a scheduler built with its own makes Tune refuse both). A choice mutates
    as a list (Ray moves to a neighbouring value); as a ``tune.choice`` domain Ray would
    multiply it like a number.
    """
    from adaptune.search.pbt_scheduler import SeededPB2, SeededPBT
    from adaptune.spaces.tune import to_tune

    p, names = exp.search.pbt, mutated_names(exp)
    specs = {n: exp.space[n] for n in names}
    keep = KeepInSpace(
        {n: (d.kind, *d.values()) for n, d in specs.items() if d.kind != "choice"}
    )
    common: dict[str, Any] = {
        "time_attr": "task_index",
        "perturbation_interval": p.perturbation_interval,
        "quantile_fraction": p.quantile_fraction,
        "synch": True,
        "custom_explore_fn": keep,
    }
    if exp.search.algorithm == "pb2":
        bounds: dict[str, Any] = {}
        for n, d in specs.items():
            set_hp(bounds, n, [float(v) for v in d.values()])
        scheduler: Any = SeededPB2(hyperparam_bounds=bounds, **common)
    else:
        mutations: dict[str, Any] = {}
        for n, d in specs.items():
            set_hp(mutations, n, list(d.values()) if d.kind == "choice" else to_tune(d))
        scheduler = SeededPBT(
            hyperparam_mutations=mutations, resample_probability=p.resample_probability, **common
        )
    scheduler.seed(exp.search.seed)
    return scheduler


def build_population_search(exp: Experiment) -> Any:
    """Tune's ``BasicVariantGenerator``, seeded: the initial population, drawn from the space.

    No ``max_concurrent``: it counts paused trials as running, so a limit below the
    population would make it start the rest only after the first ones end, as separate
    smaller populations. The whole population exists from the start; as many trials run at
    once as the cluster's resources allow and the rest wait their turn.
    """
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=exp.search.seed)


def describe_population(exp: Experiment, T: int) -> list[str]:
    """The dry run's lines for a PBT/PB2 search: how the population starts, when and what it
    mutates, what it keeps fixed, and how many checkpoints a trial keeps."""
    s, p = exp.search, exp.search.pbt
    names, searched = mutated_names(exp), searched_names(exp)
    fixed = [n for n in searched if n not in names]
    at = ", ".join(str(k) for k in range(p.perturbation_interval, T, p.perturbation_interval))
    how = (
        f"perturbs it (x0.8 or x1.2, a choice to a neighbour; drawn afresh with probability "
        f"{p.resample_probability:g})"
        if s.algorithm == "pbt"
        else "picks new values with a GP bandit (PB2)"
    )
    return [
        f"sampler:    {s.algorithm}: a population of {s.num_samples} drawn at random from the "
        f"space (seed {s.seed}); no Optuna study",
        f"scheduler:  {s.algorithm}, which replaces search.scheduler ({s.scheduler}): after "
        f"task {at}, once every trial has finished it, the bottom "
        f"{p.quantile_fraction:g} of the population copies a top trial's checkpoint and "
        f"config, then {how}",
        f"  mutated:  {', '.join(names)}",
        f"  fixed:    {', '.join(fixed) or 'none'} (drawn once per trial; copied with a donor)",
        f"  kept:     {checkpoints_to_keep(exp)} checkpoints per trial (a donor's must outlive "
        f"its copy); donors and new values drawn from seed {s.seed}",
    ]


def log_population(callback: Any, exp: Experiment) -> None:
    """Ray's exploit log (``pbt_global.txt``: one JSON line per exploit, with the donor and
    the old and new config) on the search's parent run, when the search is local; nothing
    for another algorithm."""
    local = local_results_dir(exp) if is_population(exp) else None
    path = None if local is None else local / POLICY_LOG
    if path is not None and path.is_file():
        callback.client.log_artifact(callback.start_parent(), str(path))


# -- MLflow: per-task values and lineage ------------------------------------------------------
def hp_metrics(exp: Experiment, result: dict[str, Any], config: dict[str, Any]) -> dict[str, float]:
    """``hp/<name>`` for each searched number: the value ``config`` (the config the trial
    trained the reported task with) holds. MLflow params cannot change, so PBT's mutations
    are logged as these series (step = task index). A value the report carries (a name in
    ``run.schedule``) stands; a string has no metric form (its param, and the lineage, say it).
    """
    out = {}
    for name in searched_names(exp):
        try:
            value = get_hp(config, name)
        except (KeyError, TypeError):
            continue
        if f"hp/{name}" not in result and isinstance(value, int | float):
            out[f"hp/{name}"] = float(value)
    return out


def lineage_tags(result: dict[str, Any], trial_id: str) -> dict[str, str]:
    """``adaptune.lineage`` (the trial that trained each task, ``"b7,b7,a1"``) and, when another
    trial trained some of them (a PBT exploit), ``adaptune.pbt.donors`` (``"1:b7,2:b7"``)."""
    lineage = result.get("lineage")
    if not isinstance(lineage, str) or not lineage:
        return {}
    tags = {LINEAGE_TAG: lineage}
    donors = [f"{k}:{t}" for k, t in enumerate(lineage.split(","), start=1) if t != trial_id]
    if donors:
        tags[DONORS_TAG] = ",".join(donors)
    return tags


def log_lineage(client: Any, run_id: str, exp: Experiment, checkpoint: Any, task: int) -> None:
    """After the last task: the checkpoint's ``progress.json`` history (who trained each task
    with which values) and the searched values of its config, as the run's ``lineage.json``."""
    if not is_population(exp) or task < len(exp.run.stream.tasks):
        return
    with checkpoint.filesystem.open_input_stream(
        f"{checkpoint.path.rstrip('/')}/progress.json"
    ) as f:
        progress = json.loads(f.read().decode("utf-8"))
    history = progress.get("history") or []
    record = {
        "lineage": ",".join(str(h.get("trial")) for h in history),
        "history": history,
        "values": {n: get_hp(progress["config"], n) for n in searched_names(exp)},
    }
    client.log_dict(run_id, record, LINEAGE_ARTIFACT)


@dataclass(frozen=True)
class Lineage:
    """What ``adaptune export`` writes for a PBT winner."""

    values: dict[str, Any]  # every searched name -> its value in the trial's final config
    schedule: dict[str, list[Any]]  # each mutated name -> the value each task trained with


def read_lineage(client: Any, child: Any, exp: Experiment) -> Lineage:
    """The winner's ``lineage.json``: its final values, and per task the mutated ones.

    Raises:
        ConfigError: the run has no ``lineage.json`` (it did not finish), or its history does
            not cover every task.
    """
    import tempfile

    run_id, T = child.info.run_id, len(exp.run.stream.tasks)
    with tempfile.TemporaryDirectory(prefix="adaptune-lineage-") as tmp:
        try:
            local = client.download_artifacts(run_id, LINEAGE_ARTIFACT, tmp)
            record = json.loads(Path(local).read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - MlflowException or OSError: the artifact is missing
            raise ConfigError(
                f"run {run_id}: no {LINEAGE_ARTIFACT} artifact, which a {exp.search.algorithm} "
                "trial logs after its last task; export a FINISHED trial"
            ) from None
    history = sorted(record.get("history") or [], key=lambda h: h["task"])
    if [h["task"] for h in history] != list(range(1, T + 1)):
        raise ConfigError(
            f"run {run_id}: {LINEAGE_ARTIFACT} covers tasks {[h['task'] for h in history]}, "
            f"not 1..{T}"
        )
    schedule = {n: [h["hp"][n] for h in history] for n in mutated_names(exp)}
    return Lineage(values=dict(record["values"]), schedule=schedule)


def apply_lineage(run: dict[str, Any], lineage: Lineage | None) -> None:
    """Write a PBT winner's per-task values into ``run`` (a run config as a dict), in place:
    ``run.schedule`` gets each mutated name (beside what the experiment scheduled), and the
    name's own field its first task's value."""
    if lineage is None or not lineage.schedule:
        return
    for name, per_task in lineage.schedule.items():
        set_hp(run, name, per_task[0])
    run["schedule"] = {**(run.get("schedule") or {}), **lineage.schedule}
