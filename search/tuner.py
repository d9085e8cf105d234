"""The search: Ray Tune runs the trainable, Optuna (TPE) proposes, ASHA stops, MLflow records.

``run_search(exp)`` checks everything a user can get wrong first (objective, space, scheduler,
data, model, output directory), then starts Ray, fits, and publishes the champion: the best trial
that ran every task -> its final checkpoint's ``model/`` -> an MLflow transformers model on the
search's parent run, registered with alias ``champion``.

Example:
    >>> from search.experiment import load_experiment
    >>> summary = run_search(load_experiment("experiments/quickstart.yaml"))  # doctest: +SKIP
    >>> summary.model_uri  # doctest: +SKIP
    'models:/adaptune-quickstart@champion'
"""

from __future__ import annotations

import contextlib
import difflib
import io
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptune.search.experiment import Experiment, experiment_yaml
from adaptune.search.resume import check_search_dir, inspect_search_dir, write_search_info
from adaptune.search.searcher import ContinualOptunaSearch, build_searcher
from adaptune.search.tracking import (
    MlflowTrackingCallback,
    experiment_hash,
    resolve_tracking_uri,
    searched_params,
    sqlite_file,
)
from adaptune.search.tune_loop import patient_controller
from adaptune.spaces import Dist
from adaptune.spaces.tune import build_param_space, parse_space
from adaptune.trainables.config import HYPERPARAMETERS, RunConfig, format_validation_error
from adaptune.trainables.errors import ConfigError
from pydantic import ValidationError

CHAMPION_ALIAS = "champion"
# stream-level metrics the trainable reports after every task, with the direction that is better
_STREAM_METRICS = {
    "stream_loss": "min",
    "seen_loss": "min",
    "new_task_loss": "min",
    "stream_ppl": "min",
    "seen_ppl": "min",
    "new_task_ppl": "min",
    "bwt": "max",  # negative = forgetting
    "fwt": "max",
}


def objective_metrics(exp: Experiment) -> dict[str, str]:
    """Metrics a search may optimise, with their better direction.

    ``forgetting`` is reported but never an objective: it is 0 after task 1, so every trial
    would tie at ASHA's first rung and the search would favour models that learn nothing.
    """
    allowed = dict(_STREAM_METRICS)
    for task in exp.run.stream.tasks:
        allowed[f"loss/{task.name}"] = "min"
        allowed[f"ppl/{task.name}"] = "min"
    if exp.run.model.pretrain is not None:
        allowed |= {"base_loss": "min", "base_ppl": "min"}
    return allowed


def local_results_dir(exp: Experiment) -> Path | None:
    """``<storage_path>/<name>`` as an absolute local path, or None for a URI (s3://, gs://)."""
    if "://" in exp.storage_path:
        return None
    return Path(exp.storage_path).expanduser().resolve() / exp.name


def search_location(exp: Experiment) -> str:
    """``<storage_path>/<name>``: an absolute local path, or a URI (s3://, gs://)."""
    local = local_results_dir(exp)
    return str(local) if local is not None else f"{exp.storage_path.rstrip('/')}/{exp.name}"


def optuna_storage_file(exp: Experiment) -> Path:
    """The Optuna study's sqlite file: beside the Ray results when they are local."""
    local = local_results_dir(exp)
    return local / "optuna.db" if local else Path("runs/optuna").resolve() / f"{exp.name}.db"


def check_search(exp: Experiment, *, resume: bool = False) -> None:
    """Refuse a search that cannot work, before anything starts or is written.

    Args:
        exp: the experiment.
        resume: continue the interrupted search in ``<storage_path>/<name>`` instead of
            starting one there (see :mod:`search.resume`).

    Raises:
        ConfigError: one line naming the field, the rule and the valid values; for the
            search directory, what it holds (interrupted or finished search) and whether
            ``--resume`` or ``--name`` applies.
    """
    s, T = exp.search, len(exp.run.stream.tasks)
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
    if allowed[s.metric] != s.mode:
        raise ConfigError(
            f"search.mode: {s.metric} is better when "
            f"{'lower' if allowed[s.metric] == 'min' else 'higher'}, "
            f"so mode must be {allowed[s.metric]!r} (got {s.mode!r})"
        )
    if s.scheduler == "asha" and s.grace_period > T:
        raise ConfigError(
            f"search.grace_period: must be <= the number of tasks ({T}), ASHA's max_t "
            f"(got {s.grace_period})"
        )
    space = parse_space(dict(exp.space))
    if not any(isinstance(v, Dist) for v in space.values()):
        raise ConfigError(
            "space: nothing to search; give at least one distribution "
            "(loguniform, uniform, int, choice) or use `adaptune train`"
        )
    _check_space_bounds(exp, space)
    check_search_dir(
        inspect_search_dir(search_location(exp)),
        name=exp.name,
        resume=resume,
        experiment_hash=experiment_hash(experiment_yaml(exp)),
    )


def _check_space_bounds(exp: Experiment, space: dict[str, Any]) -> None:
    """Every extreme value of every distribution must pass the run schema (lr <= 1, ...)."""
    base = exp.run.model_dump(mode="json")
    for name, spec in space.items():
        values = list(spec.values()) if isinstance(spec, Dist) else [spec]
        for value in values:
            data = _with_value(base, name, value)
            try:
                RunConfig.model_validate(data)
            except ValidationError as err:
                rule = format_validation_error(err, prefix="run")
                msg = f"space.{name}: the value {value!r} is out of range: {rule}"
                raise ConfigError(msg) from None


def _with_value(base: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(base)
    *parents, leaf = HYPERPARAMETERS[name]
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value
    return data


def build_scheduler(exp: Experiment) -> Any:
    """ASHA at task boundaries (time_attr = training_iteration = task index, max_t = #tasks)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = exp.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=len(exp.run.stream.tasks),
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The tasks after which ASHA may stop a trial (its rungs below ``max_t``).

    Ray's ASHA bracket has milestones ``grace_period * reduction_factor**k`` for
    ``k < int(log(max_t / grace_period) / log(reduction_factor) + 1)``; a trial meets a
    milestone at the first task index >= it. The trial ends at ``max_t`` anyway, so a rung
    there stops nothing.
    """
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    milestones = (grace_period * reduction_factor**k for k in range(count))
    return sorted({math.ceil(m) for m in milestones if math.ceil(m) < max_t})


def _describe_spec(spec: Any) -> str:
    if isinstance(spec, Dist):
        values = spec.values()
        if spec.kind == "choice":
            return f"choice {list(values)}"
        bounds = "inclusive" if spec.kind == "int" else ""
        return f"{spec.kind} [{values[0]}, {values[1]}]{' ' + bounds if bounds else ''}"
    return repr(spec)


def describe_search(exp: Experiment, prep: Any) -> str:
    """The resolved search, as ``adaptune search --dry-run`` prints it.

    Args:
        exp: a checked experiment (:func:`check_search` passed).
        prep: its prepared run (:func:`trainables.run.prepare`): tasks and their sizes.
    """
    s, T = exp.search, len(prep.tasks)
    space = parse_space(dict(exp.space))
    searched = {n: v for n, v in space.items() if isinstance(v, Dist)}
    run = exp.run.model_dump(mode="json")
    width = max(len(n) for n in HYPERPARAMETERS)
    lines = [f"adaptune search {exp.name} (dry run: nothing started, nothing written)", ""]
    lines.append(f"model:      {exp.run.model.name}")
    lines.append(f"tasks:      {T}")
    for t in prep.tasks:
        lines.append(
            f"  {t.name:<{width}}  {t.train.shape[0]} train blocks ({t.train_tokens:,} tokens), "
            f"{t.eval.shape[0]} eval blocks of {exp.run.stream.block_size} tokens"
        )
    lines.append(f"objective:  {s.metric} ({s.mode})")
    lines.append(f"searched:   {len(searched)} hyperparameters")
    lines += [f"  {n:<{width}}  {_describe_spec(v)}" for n, v in searched.items()]
    lines.append("fixed:      (from `space` where given there, else from `run`)")
    for name, path in HYPERPARAMETERS.items():
        if name in searched:
            continue
        value = space[name] if name in space else _leaf(run, path)
        lines.append(f"  {name:<{width}}  {value!r}")
    lines.append(f"sampler:    {s.algorithm} (seed {s.seed})")
    if s.scheduler == "asha":
        rungs = asha_rungs(s.grace_period, s.reduction_factor, T)
        where = (
            f"rungs after task {', '.join(str(r) for r in rungs)}, each keeping the best "
            f"1/{s.reduction_factor:g} of the trials that reach it"
            if rungs
            else "no rung below the last task: every trial runs all tasks"
        )
        lines.append(
            f"scheduler:  asha (max_t {T} tasks, grace_period {s.grace_period}, "
            f"reduction_factor {s.reduction_factor:g}): {where}"
        )
    else:
        lines.append(f"scheduler:  fifo (every trial runs all {T} tasks)")
    budget = f"{s.time_budget_s:g} s" if s.time_budget_s is not None else "none"
    lines.append(
        f"trials:     {s.num_samples} ({s.max_concurrent} at once), time budget {budget}, "
        f"retries per failed trial {s.max_failures}"
    )
    r = exp.resources
    lines.append(f"resources:  {r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU per trial")
    local = local_results_dir(exp)
    results = local if local is not None else f"{exp.storage_path.rstrip('/')}/{exp.name}"
    lines.append(f"results:    {results} (Ray Tune trials and checkpoints)")
    lines.append(f"optuna:     sqlite:///{optuna_storage_file(exp)} (study {exp.name!r})")
    model_name = exp.tracking.registered_model_name or f"adaptune-{exp.name}"
    lines.append(
        f"mlflow:     {resolve_tracking_uri(exp.tracking.tracking_uri, create=False)} "
        f"(experiment {exp.tracking.experiment_name or exp.name!r}, "
        f"champion models:/{model_name}@{CHAMPION_ALIAS})"
    )
    return "\n".join(lines)


def _leaf(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for part in path:
        node = node[part]
    return node


def build_tuner(
    exp: Experiment,
    prep_tasks: list[Any] | None = None,
    *,
    callback: MlflowTrackingCallback | None = None,
    searcher: ContinualOptunaSearch | None = None,
    max_failures: int | None = None,
    trainable: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """The ``ray.tune.Tuner`` for ``exp`` (call :func:`check_search` first).

    Args:
        exp: the validated experiment.
        prep_tasks: the prepared tasks (only their number is used; default: the config's).
        callback: the MLflow callback (default: a new one for ``exp``).
        searcher: the Optuna searcher (default: seeded sampler, sqlite study).
        max_failures: retries of a failed trial from its last checkpoint
            (default: ``exp.search.max_failures``).
        trainable: the function trainable (default:
            :func:`trainables.trainable.continual_trainable`; tests pass one that injects faults).
    """
    from adaptune.trainables.trainable import continual_trainable
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    s = exp.search
    trainable = trainable or continual_trainable
    max_failures = s.max_failures if max_failures is None else max_failures
    T = len(prep_tasks) if prep_tasks is not None else len(exp.run.stream.tasks)
    if s.scheduler == "asha" and T != len(exp.run.stream.tasks):
        raise ConfigError(f"ASHA max_t ({T}) must equal the stream length")
    searcher = searcher or build_searcher(
        study_name=exp.name,
        storage_file=optuna_storage_file(exp),
        metric=s.metric,
        mode=s.mode,
        max_t=T,
        algorithm=s.algorithm,
        seed=s.seed,
    )
    callback = callback or MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
    local = local_results_dir(exp)
    storage_path = str(local.parent) if local is not None else exp.storage_path
    resources = {"cpu": exp.resources.cpus_per_trial, "gpu": exp.resources.gpus_per_trial}
    # Ray's default output prints the whole nested config of the best trial at every update; a
    # CLIReporter shows one row per trial with the searched values and the task-level metrics.
    # It only takes effect with the classic output engine (RAY_AIR_NEW_OUTPUT=0).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # num_to_keep forces an experiment snapshot after every checkpoint; on short tasks Ray then
    # warns at every task that snapshots are frequent. That is the intended trade-off here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    reporter = tune.CLIReporter(
        parameter_columns={"/".join(HYPERPARAMETERS[n]): n for n in exp.space},
        metric_columns={
            "training_iteration": "tasks",
            s.metric: s.metric,
            "forgetting": "forgetting",
            "new_task_loss": "new_task_loss",
        },
        max_report_frequency=30,
        # no metric/mode here: Tune passes TuneConfig's to the reporter's setup(), which raises
        # ValueError ("already instantiated with their own metric and mode") when both are set
        sort_by_metric=True,
        max_column_length=14,
    )
    return tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=build_param_space(exp),
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=build_scheduler(exp),
            num_samples=s.num_samples,
            time_budget_s=s.time_budget_s,
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            # Tune's default (False) starts a new worker process per trial, which re-imports
            # torch and transformers: 3-4 s a trial on 2 cores (docs/benchmarks.md, section 2).
            # The trainable keeps nothing between trials and frees CUDA memory when it ends.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=storage_path,
            callbacks=[callback],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            verbose=1,
            progress_reporter=reporter,
        ),
    )


def restore_tuner(
    exp: Experiment, *, trainable: Callable[[dict[str, Any]], None] | None = None
) -> Any:
    """The interrupted search in ``<storage_path>/<name>`` as a ``ray.tune.Tuner`` to fit again.

    ``Tuner.restore`` brings back what :func:`build_tuner` pickled in ``tuner.pkl`` (searcher,
    scheduler, callbacks with the MLflow parent run id, run config) and, from the latest
    experiment snapshot, every trial with its last checkpoint and the searcher's state (the
    Optuna study reopens from its sqlite file). Finished and errored trials stay as they are;
    unfinished ones restart from their last task checkpoint (``tune.get_checkpoint()`` in the
    trainable). The trainable itself is not pickled and is passed again.
    """
    from adaptune.trainables.trainable import continual_trainable
    from ray import tune

    resources = {"cpu": exp.resources.cpus_per_trial, "gpu": exp.resources.gpus_per_trial}
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the pickled CLIReporter needs the classic engine
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return tune.Tuner.restore(
        search_location(exp),
        trainable=tune.with_resources(trainable or continual_trainable, resources),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
        param_space=build_param_space(exp),  # checked against the original's keys
    )


def close_dangling_trials(study: Any) -> int:
    """Tell PRUNED every trial still RUNNING in ``study`` after a search ended; returns how many.

    Tune tells the searcher nothing about trials it stops when ``time_budget_s`` runs out, nor
    about a trial a killed driver had asked for but not recorded that no resumed trial adopted.
    Neither ran every task, so, like a trial ASHA stopped, it is PRUNED (with the intermediate
    values it reported, if any).
    """
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
    return len(running)


def search_interrupted(exp: Experiment) -> bool:
    """Whether the last ``fit()`` of ``exp``'s search stopped before the search ended (Ctrl-C).

    The ``ResultGrid`` that ``fit()`` returns cannot tell: after Ctrl-C, Tune writes its
    experiment snapshot, then stops the running trials, which marks them TERMINATED in the
    trials it returns. The snapshot keeps them RUNNING or PENDING, which is what a resume sees.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(search_location(exp)).trials
    if any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return True
    # every trial ended, but Tune had not asked for all of them (no time budget to exhaust)
    return len(trials) < exp.search.num_samples and exp.search.time_budget_s is None


@dataclass
class TrialRow:
    trial_id: str
    value: float | None  # objective at the trial's last result
    tasks_done: int
    status: str  # "complete", "stopped" (by ASHA), "error"
    params: dict[str, Any]


@dataclass
class SearchSummary:
    rows: list[TrialRow]  # best first
    parent_run_id: str
    tracking_uri: str
    best: TrialRow | None = None
    model_uri: str | None = None  # models:/NAME@champion
    model_version: str | None = None
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False  # stopped before every trial ended (Ctrl-C): resume with --resume


def trial_rows(exp: Experiment, results: Any) -> list[TrialRow]:
    """One row per trial, complete trials first, each group best first."""
    T, s = len(exp.run.stream.tasks), exp.search
    rows = []
    for r in results:
        m = r.metrics or {}
        done = int(m.get("task_index", 0))
        value = m.get(s.metric)
        value = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        status = "error" if r.error else "complete" if done >= T else "stopped"
        rows.append(
            TrialRow(
                trial_id=str(m.get("trial_id") or Path(r.path).name.removeprefix("trial-")),
                value=value,
                tasks_done=done,
                status=status,
                params=searched_params(r.config, list(exp.space)),
            )
        )
    sign = 1 if s.mode == "min" else -1

    def key(row: TrialRow) -> tuple[int, float]:
        group = {"complete": 0, "stopped": 1, "error": 2}[row.status]
        return (group, sign * row.value if row.value is not None else math.inf)

    return sorted(rows, key=key)


def format_table(rows: list[TrialRow], metric: str, *, markdown: bool = False) -> str:
    """Trials as a text (or markdown) table."""
    names = list(rows[0].params) if rows else []
    head = ["rank", "trial", metric, "tasks", "status", *names]
    body = [
        [
            str(i),
            r.trial_id,
            f"{r.value:.4f}" if r.value is not None else "-",
            str(r.tasks_done),
            r.status,
            *(_fmt(r.params[n]) for n in names),
        ]
        for i, r in enumerate(rows, start=1)
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max([len(c), *(len(b[i]) for b in body)]) for i, c in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _objective_plot(rows: list[TrialRow], metric: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ordered = sorted(rows, key=lambda r: r.trial_id)
    for status, marker in (("complete", "o"), ("stopped", "x"), ("error", "s")):
        pts = [(i, r.value) for i, r in enumerate(ordered) if r.status == status and r.value]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=status)
    ax.set_xlabel("trial (launch order)")
    ax.set_ylabel(f"{metric} at last task reached")
    ax.legend()
    fig.tight_layout()
    return fig


def _log_summary(
    callback: MlflowTrackingCallback,
    exp: Experiment,
    rows: list[TrialRow],
    study: Any,
    notes: list[str],
) -> None:
    """Top-k table, objective plot and Optuna importances on the parent run."""
    import matplotlib.pyplot as plt
    import optuna

    client, parent = callback.client, callback.start_parent()
    metric = exp.search.metric
    client.log_text(parent, format_table(rows, metric, markdown=True), "trials.md")
    buf = io.StringIO()
    names = list(rows[0].params) if rows else []
    buf.write(",".join(["trial_id", metric, "tasks_done", "status", *names]) + "\n")
    for r in rows:
        cells = [r.trial_id, "" if r.value is None else repr(r.value), str(r.tasks_done), r.status]
        buf.write(",".join(cells + [str(r.params[n]) for n in names]) + "\n")
    client.log_text(parent, buf.getvalue(), "trials.csv")
    fig = _objective_plot(rows, metric)
    client.log_figure(parent, fig, "objective_per_trial.png")
    plt.close(fig)

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        notes.append(f"parameter importances skipped: {len(complete)} complete trial(s), need 2")
        return
    try:
        importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as err:
        notes.append(f"parameter importances skipped: {err}")
        return
    client.log_dict(parent, importances, "param_importances.json")
    from mlflow.entities import Metric

    client.log_batch(
        parent, metrics=[Metric(f"importance/{k}", float(v), 0, 0) for k, v in importances.items()]
    )


def publish_champion(
    callback: MlflowTrackingCallback, exp: Experiment, checkpoint_dir: Path, trial_id: str
) -> tuple[str, str]:
    """Log the checkpoint's ``model/`` on the parent run and register it as ``@champion``.

    ``mlflow.transformers.log_model`` is given the loaded model and tokenizer: MLflow 3.17's
    local-checkpoint path form fails with transformers 5 (``task_metadata[1]["impl"]`` is a str).

    Returns:
        (``models:/NAME@champion``, the registered version)
    """
    import mlflow
    import torch
    import transformers

    model_dir = checkpoint_dir / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    name = exp.tracking.registered_model_name or f"adaptune-{exp.name}"
    mlflow.set_tracking_uri(callback.tracking_uri)
    client, parent = callback.client, callback.start_parent()
    with mlflow.start_run(run_id=parent):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="champion",
            task="text-generation",
            pip_requirements=[f"transformers=={transformers.__version__}", "torch", "safetensors"],
            metadata={"adaptune.trial_id": trial_id},
        )
    version = mlflow.register_model(info.model_uri, name, tags={"adaptune.trial_id": trial_id})
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    client.set_tag(parent, "adaptune.champion_trial_id", trial_id)
    return f"models:/{name}@{CHAMPION_ALIAS}", str(version.version)


# Modules the driver imports after ray.init (the sqlite stores, the heatmaps, MLflow's
# transformers flavour), imported in a thread while the driver waits on ray.init, and those it
# imports only after the trials (Optuna's fANOVA importances with scikit-learn, the champion's
# transformers model class: 4 s together on 2 cores), imported in a thread while fit() runs.
# Only packages that nothing in the Tune loop imports go in the second group: two threads
# importing the same modules at once can trip importlib's deadlock detection
# (docs/benchmarks.md, section 2).
_NEEDED_AFTER_INIT = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "optuna.storages._rdb.storage",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "mlflow.transformers",
)
_NEEDED_AFTER_TRIALS = ("sklearn.ensemble", "optuna.importance")


def preload_modules(
    names: tuple[str, ...], exp: Experiment | None = None, tracking_uri: str | None = None
) -> None:
    """Import ``names``; given ``exp``, also the class its champion loads with; given
    ``tracking_uri``, open MLflow's store there (a new sqlite store creates its tables: 1-2 s).
    A module or store that fails here fails again where it is used, so errors are ignored."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - best effort; the real import reports it
            continue
    if tracking_uri is not None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))  # cached per URI
        except Exception:  # noqa: BLE001 - reported by the callback's own client
            pass
    if exp is None:
        return
    try:
        import transformers
        from adaptune.trainables.model import TINY

        model = exp.run.model
        if model.name == TINY:
            transformers.GPT2LMHeadModel  # noqa: B018 - the lazy module imports it here
        else:  # the class AutoModelForCausalLM picks for this config (config only)
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            config = transformers.AutoConfig.from_pretrained(
                model.name, revision=model.revision, trust_remote_code=model.trust_remote_code
            )
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # noqa: BLE001 - e.g. remote code: loaded where it is used
        pass


def _preload_thread(
    names: tuple[str, ...], exp: Experiment | None = None, tracking_uri: str | None = None
) -> threading.Thread:
    thread = threading.Thread(
        target=preload_modules,
        args=(names, exp, tracking_uri),
        name="adaptune-preload",
        daemon=True,
    )
    thread.start()
    return thread


def _new_sqlite_paths(tracking_uri: str) -> list[Path]:
    """What opening a sqlite tracking store would create: the file and its missing parents,
    deepest first (removed again if Ray fails to start)."""
    path = sqlite_file(tracking_uri)
    if path is None:
        return []
    created = []
    while not path.exists():
        created.append(path)
        if path.parent == path:
            break
        path = path.parent
    return created


def _remove_new_paths(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()  # only if empty
            else:
                path.unlink()


# The environment of a local cluster's processes, set where the user has not (each a Ray
# setting read from its RAY_ variable; a Ray that lacks one ignores it). Ray's log monitor looks
# for new log files on every pass, ten times a second, while a node has fewer than 1,000 of them;
# with the threshold at 0 it looks every 0.5 s (LOG_NAME_UPDATE_INTERVAL_S) and still reads the
# files it has ten times a second: a new worker's first lines reach the console up to 0.5 s
# later, for about 0.6 % of a core less. Three of the raylet's 100-200 ms timers run once a
# second: the object manager's (pulls and pushes between nodes: a local cluster has one node),
# the idle-worker reaper (idle workers live up to 1 s longer) and the plasma-store GC check;
# about 0.3 % of a core less (`benchmarks/overhead.py --only floor`). Ray starts its workers at
# nice 15 so that its own processes and the user's stay responsive beside them; a search's
# workers run its trials, which then lose the core to every wake-up of Ray's processes on it
# (the same trial 1.06-1.08x the plain call's time before, 1.01-1.02x after: docs/benchmarks.md,
# section 2), while a plain training script runs at nice 0: so do trials here
# (RAY_worker_niceness=15 restores Ray's).
LOCAL_RAY_ENV = {
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "RAY_object_manager_timer_freq_ms": "1000",
    "RAY_kill_idle_workers_interval_ms": "1000",
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_worker_niceness": "0",
}


def local_cpu_count() -> int | None:
    """CPUs for a local Ray cluster where this process may run on fewer than Ray would count
    (``taskset``, a cpuset), else None (Ray counts them).

    Ray counts the machine's CPUs, or a container's cgroup CPU quota where one is smaller, but
    not the process's CPU affinity, so ``taskset -c 0-3 adaptune search`` on a 64-core machine
    would schedule 64 one-CPU trials on 4 cores, and start as many idle workers as it counts
    CPUs, each polling a little. The smaller of the two counts wins: a container limited to 2
    CPUs (``--cpus 2``) on a cpuset of 8 gets 2.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return allowed if allowed < _ray_cpu_count() else None


def _ray_cpu_count() -> int:
    """The CPUs ``ray.init()`` counts on this machine: the cgroup quota where one is set (Ray's
    own helper, private in Ray 2.60), else the machine's."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:  # moved in another Ray: count the machine's
        return os.cpu_count() or 1
    return int(get_num_cpus(override_docker_cpu_warning=True))


def _use_token_auth_if_available(address: str) -> None:
    """Send this machine's Ray auth token when connecting to an explicit address.

    Ray >= 2.59 turns token authentication on for clusters started here (``ray start --head``
    once ``~/.ray/auth_token`` exists), but ``ray.init(address="host:port")`` sends the token only
    in token mode, which it enables by itself for ``address=None/"auto"`` alone; otherwise the
    driver retries, then fails with ``InvalidAuthToken``. Setting ``RAY_AUTH_MODE=token`` after
    ``import ray`` is not enough (RayConfig is cached), so use Ray's own helper, which refreshes
    it. An explicit ``RAY_AUTH_MODE`` always wins.
    """
    if "RAY_AUTH_MODE" in os.environ or address.startswith("ray://"):
        return
    try:  # private in Ray 2.59-2.60; the same call ray.init() makes for address="auto"
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # older Ray: no token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def run_search(
    exp: Experiment,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    max_failures: int | None = None,
    echo: Callable[[str], None] = print,
    trainable: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> SearchSummary:
    """Check, launch (or resume), fit and publish one search.

    Args:
        exp: the experiment (from :func:`search.experiment.load_experiment`).
        address: an existing Ray cluster (``ray://`` or ``host:port``); default: a local one.
        num_cpus: CPUs of the local cluster (default: those this process may run on,
            :func:`local_cpu_count`).
        log_to_driver: stream trial output to this process.
        max_failures: retries of a failed trial from its last checkpoint
            (default: ``exp.search.max_failures``).
        echo: where progress lines go.
        trainable: the function trainable (default: ``continual_trainable``).
        resume: continue the interrupted search of this name (:func:`restore_tuner`) with
            its MLflow parent run and Optuna study; ``max_failures`` then comes from the
            interrupted search.

    Raises:
        ConfigError: a bad experiment, or a search directory that does not fit ``resume``
            (see :func:`search.resume.check_search_dir`), before Ray starts or anything is
            written.
    """
    from adaptune.trainables.run import prepare

    check_search(exp, resume=resume)
    prep = prepare(exp.run)  # data and model checks, before anything is written
    names = [t.name for t in prep.tasks]

    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
        if address:
            _use_token_auth_if_available(address)
            kwargs["address"] = address
        else:
            kwargs |= {"num_cpus": num_cpus or local_cpu_count(), "include_dashboard": False}
            for key, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(key, value)  # inherited by the processes ray.init starts
        # ray.init mostly waits for the GCS and raylet processes to come up: meanwhile a
        # thread imports what the driver needs next and opens the MLflow store, which a
        # failed ray.init takes away again (joined before this thread imports anything itself)
        tracking_uri = resolve_tracking_uri(exp.tracking.tracking_uri, create=False)
        new_paths = _new_sqlite_paths(tracking_uri)
        preload = _preload_thread(_NEEDED_AFTER_INIT, tracking_uri=tracking_uri)
        try:
            ray.init(**kwargs)
        except BaseException:
            preload.join()
            _remove_new_paths(new_paths)
            raise
        preload.join()
        started = True

    location = search_location(exp)
    storage_url = f"sqlite:///{optuna_storage_file(exp)}"
    searcher: ContinualOptunaSearch | None = None  # a resumed search's lives in the Tuner
    study: Any = None  # the Optuna study
    callback = MlflowTrackingCallback(
        exp,
        experiment_yaml=experiment_yaml(exp),
        extra_tags={
            "adaptune.optuna_storage": storage_url,
            "adaptune.optuna_study": exp.name,
            "adaptune.search_dir": location,
        },
    )
    if resume:
        # Ray restores its own copy of the callback from tuner.pkl, which holds this parent
        # run id; this copy logs the summary and the champion on the same run.
        callback.resume_parent(inspect_search_dir(location).info["parent_run_id"])
        write_search_info(location, state="running")
        import optuna

        study = optuna.load_study(study_name=exp.name, storage=storage_url)
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        echo(
            f"adaptune search {exp.name}: resuming ({done} of {exp.search.num_samples} trials "
            f"finished) from {location}; MLflow parent run {callback.parent_run_id}"
        )
        tuner = restore_tuner(exp, trainable=trainable)
    else:
        searcher = build_searcher(
            study_name=exp.name,
            storage_file=optuna_storage_file(exp),
            metric=exp.search.metric,
            mode=exp.search.mode,
            max_t=len(names),
            algorithm=exp.search.algorithm,
            seed=exp.search.seed,
        )
        echo(
            f"adaptune search {exp.name}: {exp.search.num_samples} trials over "
            f"{', '.join(callback.param_names)}; {len(names)} tasks ({', '.join(names)}); "
            f"objective {exp.search.metric} ({exp.search.mode}); "
            f"scheduler {exp.search.scheduler}"
        )
        # The parent run exists before the Tuner pickles the callback (tuner.pkl), so a
        # resumed search logs to the same run.
        callback.start_parent()
        write_search_info(
            location,
            name=exp.name,
            state="running",
            experiment_hash=experiment_hash(callback.experiment_yaml),
            parent_run_id=callback.parent_run_id,
            tracking_uri=callback.tracking_uri,
            optuna_storage=storage_url,
        )
        tuner = build_tuner(
            exp,
            prep.tasks,
            callback=callback,
            searcher=searcher,
            max_failures=max_failures,
            trainable=trainable,
        )
    # mostly while fit() waits for the first trials' workers to start (they import torch)
    preload = _preload_thread(_NEEDED_AFTER_TRIALS, exp)
    try:
        with patient_controller():  # Tune's loop waits for events, not 10 times a second
            results = tuner.fit()
        preload.join()
    except BaseException:
        callback.end_parent("FAILED")
        if started:
            ray.shutdown()
        raise
    # Nothing below needs Ray (results, checkpoints and the study are files): shutting the
    # local cluster down (1-3 s of waiting for its processes) overlaps the champion's upload.
    shutdown = threading.Thread(target=ray.shutdown, name="adaptune-ray-shutdown")
    if started:
        shutdown.start()
    try:
        return _finish_search(exp, results, callback, searcher, study)
    finally:
        if started:
            shutdown.join()


def _finish_search(
    exp: Experiment,
    results: Any,
    callback: MlflowTrackingCallback,
    searcher: ContinualOptunaSearch | None,
    study: Any,
) -> SearchSummary:
    """After ``fit()``: the summary on the parent run, then the champion."""
    location = search_location(exp)
    rows = trial_rows(exp, results)
    summary = SearchSummary(rows=rows, parent_run_id=callback.start_parent(),
                            tracking_uri=callback.tracking_uri)
    if search_interrupted(exp):
        summary.interrupted = True
        callback.end_parent("KILLED")
        return summary
    if searcher is not None:
        study = searcher.study
    dangling = close_dangling_trials(study)
    if dangling:
        summary.notes.append(
            f"{dangling} Optuna trial(s) left running (time budget, or lost with a killed "
            "driver): told PRUNED"
        )
    _log_summary(callback, exp, rows, study, summary.notes)
    best = next((r for r in rows if r.status == "complete" and r.value is not None), None)
    summary.best = best
    if best is None:
        summary.notes.append("no trial ran every task: nothing registered")
        callback.end_parent("FAILED")
        write_search_info(location, state="finished")
        return summary
    result = next(r for r in results if (r.metrics or {}).get("trial_id") == best.trial_id)
    if result.checkpoint is None:
        raise RuntimeError(f"trial {best.trial_id} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        summary.model_uri, summary.model_version = publish_champion(
            callback, exp, Path(ckpt), best.trial_id
        )
    callback.client.log_metric(summary.parent_run_id, f"best/{exp.search.metric}", best.value)
    callback.end_parent("FINISHED")
    write_search_info(location, state="finished")
    return summary
