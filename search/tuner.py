"""The search: Ray Tune runs the trainable, Optuna (TPE) proposes, ASHA stops, MLflow records.

``run_search(exp)`` checks everything a user can get wrong first (objective, space, scheduler,
data, model, output directory), then starts Ray, fits, and publishes the champion: the trial
that ran every task picked by ``search.select`` (default: the best on the first objective;
:mod:`search.select`) -> its final checkpoint's ``model/`` -> an MLflow transformers model on
the search's parent run, registered with alias ``champion``. A multi-objective search also gets
its Pareto front on the parent run (:mod:`search.pareto`). With ``search.confirm`` the best
configurations first run again with more seeds and the best mean wins (:mod:`search.confirm`).

Example:
    >>> from adaptune.search.experiment import load_experiment
    >>> summary = run_search(load_experiment("experiments/quickstart.yaml"))  # doctest: +SKIP
    >>> summary.model_uri  # doctest: +SKIP
    'models:/adaptune-quickstart@champion'
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptune.search.champion import publish_champion
from adaptune.search.checks import check_search, check_search_folder
from adaptune.search.confirm_run import ConfirmRunner
from adaptune.search.experiment import Experiment, experiment_yaml
from adaptune.search.local_ray import start_ray
from adaptune.search.locations import (
    local_results_dir,
    optuna_storage_url,
    search_location,
)
from adaptune.search.lock import SearchLock
from adaptune.search.pareto import log_pareto
from adaptune.search.pbt import (
    build_population_scheduler,
    build_population_search,
    checkpoints_to_keep,
    is_population,
    log_population,
)
from adaptune.search.preload import NEEDED_AFTER_TRIALS, preload_thread
from adaptune.search.records import experiment_hash
from adaptune.search.resume import inspect_search_dir, write_search_info
from adaptune.search.searcher import ContinualOptunaSearch, experiment_searcher
from adaptune.search.select import champion_row, objective_text
from adaptune.search.stores import resolve_tracking_uri
from adaptune.search.summary import SearchSummary, log_summary, trial_rows
from adaptune.search.tags import OPTUNA_STORAGE_TAG, OPTUNA_STUDY_TAG, SEARCH_DIR_TAG
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.search.tune_loop import patient_controller
from adaptune.search.warm import (
    WarmStart,
    describe_warm_start,
    given_trial,
    load_warm_start,
    record_warm_start,
)
from adaptune.spaces.paths import tune_key
from adaptune.spaces.tune import build_param_space

Trainable = Callable[[dict[str, Any]], None]


def build_scheduler(exp: Experiment) -> Any:
    """ASHA at task boundaries (time_attr = training_iteration = task index, max_t = #tasks)."""
    from adaptune.search.asha import ResumableASHAScheduler
    from ray.tune.schedulers import FIFOScheduler

    s = exp.search
    if is_population(exp):  # PBT replaces ASHA/FIFO (search/pbt.py)
        return build_population_scheduler(exp)
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ResumableASHAScheduler(  # Ray's ASHA, its rungs kept across --resume
        time_attr="training_iteration",
        max_t=len(exp.run.stream.tasks),
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _classic_output() -> None:
    """Ray Tune's classic output engine, unless the user chose one: the CLIReporter that
    :func:`build_tuner` gives (and ``tuner.pkl`` keeps) takes effect only there."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # num_to_keep forces an experiment snapshot after every checkpoint; on short tasks Ray then
    # warns at every task that snapshots are frequent. That is the intended trade-off here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def build_tuner(
    exp: Experiment,
    *,
    callback: MlflowTrackingCallback,
    searcher: ContinualOptunaSearch | None,
    trainable: Trainable,
    quiet: bool = False,
) -> Any:
    """The ``ray.tune.Tuner`` for ``exp`` (call :func:`search.checks.check_search` first).

    Args:
        exp: the validated experiment.
        callback: the MLflow callback, its parent run started (``tuner.pkl`` keeps its id).
        searcher: the Optuna searcher (:func:`search.searcher.build_searcher`); None for
            PBT/PB2, whose population Tune's seeded variant generator draws (search/pbt.py).
        trainable: the function trainable (:func:`trainables.trainable.continual_trainable`;
            tests pass one that injects faults).
        quiet: no progress table (Tune's ``verbose=0``).
    """
    from adaptune.search.asha import scheduler_callbacks
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    s = exp.search
    scheduler = build_scheduler(exp)
    local = local_results_dir(exp)
    storage_path = str(local.parent) if local is not None else exp.storage_path
    resources = trial_resources(exp)
    _classic_output()
    # Ray's default output prints the whole nested config of the best trial at every update; a
    # CLIReporter shows one row per trial with the searched values and the task-level metrics.
    reporter = tune.CLIReporter(
        parameter_columns={tune_key(n): n for n in exp.space},
        metric_columns={
            "training_iteration": "tasks",
            **{m: m for m in s.metrics},
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
            # Tune (and ASHA) follow one metric; a multi-objective searcher keeps its list
            metric=s.primary_metric,
            mode=s.primary_mode,
            search_alg=(
                build_population_search(exp)
                if searcher is None
                else ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
            ),
            scheduler=scheduler,
            num_samples=s.num_samples,
            time_budget_s=s.time_budget_s,
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            # Tune's default (False) starts a new worker process per trial, which re-imports
            # torch and transformers (docs/benchmarks.md, section 2). The trainable keeps
            # nothing between trials and frees CUDA memory when it ends.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=storage_path,
            # the scheduler's state rides in Tune's experiment snapshot (search/asha.py)
            callbacks=[callback, *scheduler_callbacks(scheduler)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_to_keep(exp)),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            verbose=0 if quiet else 1,
            progress_reporter=reporter,
        ),
    )


def trial_resources(exp: Experiment) -> dict[str, float]:
    """What each trial reserves, for ``tune.with_resources``: CPUs and a GPU share (0.25: four
    trials on one GPU)."""
    return {"cpu": exp.resources.cpus_per_trial, "gpu": exp.resources.gpus_per_trial}


def restore_tuner(exp: Experiment, *, trainable: Trainable) -> Any:
    """The interrupted search in ``<storage_path>/<name>`` as a ``ray.tune.Tuner`` to fit again.

    ``Tuner.restore`` brings back what :func:`build_tuner` pickled in ``tuner.pkl`` (searcher,
    scheduler, callbacks with the MLflow parent run id, run config) and, from the latest
    experiment snapshot, every trial with its last checkpoint, the searcher's state (the
    Optuna study reopens from its sqlite file) and the callbacks' states, among them ASHA's
    rungs (:mod:`search.asha`: Ray keeps no scheduler state of its own). Finished and errored
    trials stay as they are; unfinished ones restart from their last task checkpoint
    (``tune.get_checkpoint()`` in the trainable). The trainable itself is not pickled and is
    passed again.
    """
    from ray import tune

    resources = trial_resources(exp)
    _classic_output()
    return tune.Tuner.restore(
        search_location(exp),
        trainable=tune.with_resources(trainable, resources),
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


def run_search(
    exp: Experiment,
    *,
    address: str | None = None,
    trainable: Trainable | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> SearchSummary:
    """Check, launch (or resume), fit and publish one search.

    Args:
        exp: the experiment (from :func:`search.experiment.load_experiment`).
        address: an existing Ray cluster (``ray://`` or ``host:port``); default: a local one
            (:func:`search.local_ray.start_ray`).
        trainable: the function trainable (default: ``continual_trainable``).
        resume: continue the interrupted search of this name (:func:`restore_tuner`) with
            its MLflow parent run and Optuna study; ``max_failures`` then comes from the
            interrupted search.
        quiet: print nothing: neither our lines nor Tune's progress table (a resumed search
            keeps the output setting it was started with).

    Raises:
        ConfigError: a bad experiment, or a search directory that does not fit ``resume``
            (see :func:`search.resume.check_search_dir`), before Ray starts or anything is
            written.
    """
    from adaptune.trainables.run import prepare

    # The lock comes first: a second driver is told who runs the search, not what the
    # folder the running one is writing looks like. Released (its files removed) on any error.
    with SearchLock(search_location(exp)):
        check_search(exp, resume=resume, folder=False)
        # an earlier search's trials, read before Ray starts; a resumed search's searcher
        # holds them already (tuner.pkl)
        warm = None if resume else load_warm_start(exp)
        prep = prepare(exp.run)  # data and model checks, before anything is written
        check_search_folder(exp, resume=resume)  # a name clash last: fix the rest in one round
        return _search(
            exp, prep, address=address, trainable=trainable, resume=resume, quiet=quiet,
            warm=warm,
        )


def _search(
    exp: Experiment,
    prep: Any,
    *,
    address: str | None,
    trainable: Trainable | None,
    resume: bool,
    quiet: bool,
    warm: WarmStart | None = None,
) -> SearchSummary:
    """:func:`run_search` once every check has passed: start Ray, fit, publish."""
    import ray

    names = [t.name for t in prep.tasks]
    say = (lambda _: None) if quiet else print
    started = start_ray(address, resolve_tracking_uri(exp.tracking.tracking_uri, create=False))
    if trainable is None:  # imported once Ray runs (start_ray's thread imports meanwhile)
        from adaptune.trainables.trainable import continual_trainable

        trainable = continual_trainable

    location = search_location(exp)
    storage_url = optuna_storage_url(exp)
    searcher: ContinualOptunaSearch | None = None  # a resumed search's lives in the Tuner
    study: Any = None  # the Optuna study
    callback = MlflowTrackingCallback(
        exp,
        experiment_yaml=experiment_yaml(exp),
        extra_tags={
            OPTUNA_STORAGE_TAG: storage_url,
            OPTUNA_STUDY_TAG: exp.name,
            SEARCH_DIR_TAG: location,
        },
    )
    if resume:
        # Ray restores its own copy of the callback from tuner.pkl, which holds this parent
        # run id; this copy logs the summary and the champion on the same run.
        callback.resume_parent(inspect_search_dir(location).info["parent_run_id"])
        write_search_info(location, state="running")
        import optuna

        # PBT/PB2 have no study (search/pbt.py): nothing to count there
        study = None if is_population(exp) else optuna.load_study(
            study_name=exp.name, storage=storage_url
        )
        trials = [] if study is None else study.get_trials(deepcopy=False)
        done = sum(t.state.is_finished() and not given_trial(t) for t in trials)
        say(
            f"adaptune search {exp.name}: resuming ({done} of {exp.search.num_samples} trials "
            f"finished) from {location}; MLflow parent run {callback.parent_run_id}"
        )
        tuner = restore_tuner(exp, trainable=trainable)
    else:
        searcher = None if is_population(exp) else experiment_searcher(exp, len(names), warm)
        say(
            f"adaptune search {exp.name}: {exp.search.num_samples} trials over "
            f"{', '.join(callback.param_names)}; {len(names)} tasks ({', '.join(names)}); "
            f"objective {objective_text(exp.search)}; "
            f"scheduler {exp.search.algorithm if is_population(exp) else exp.search.scheduler}"
        )
        # The parent run exists before the Tuner pickles the callback (tuner.pkl), so a
        # resumed search logs to the same run.
        callback.start_parent()
        if warm is not None:
            record_warm_start(callback.client, callback.start_parent(), warm)
            say(describe_warm_start(warm))
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
            exp, callback=callback, searcher=searcher, trainable=trainable, quiet=quiet
        )
    # mostly while fit() waits for the first trials' workers to start (they import torch)
    preload = preload_thread(NEEDED_AFTER_TRIALS, exp)
    try:
        with patient_controller():  # Tune's loop waits for events, not 10 times a second
            results = tuner.fit()
        preload.join()
    except BaseException:
        callback.end_parent("FAILED")
        if started:
            ray.shutdown()
        raise
    # Once the confirmation runs (search.confirm) are done, nothing needs Ray (results,
    # checkpoints and the study are files): shutting the local cluster down (waiting for its
    # processes) overlaps the champion's upload.
    shutdown = threading.Thread(target=ray.shutdown, name="adaptune-ray-shutdown")
    confirm = ConfirmRunner(trainable, quiet=quiet, release_ray=shutdown.start if started else None)
    try:
        return _finish_search(exp, results, callback, searcher, study, confirm)
    finally:
        if started:
            if shutdown.ident is None:  # _finish_search returned before the confirmation
                shutdown.start()
            shutdown.join()


def _finish_search(
    exp: Experiment,
    results: Any,
    callback: MlflowTrackingCallback,
    searcher: ContinualOptunaSearch | None,
    study: Any,
    confirm: ConfirmRunner,
) -> SearchSummary:
    """After ``fit()``: the confirmation runs, the summary on the parent run, the champion."""
    location = search_location(exp)
    rows = trial_rows(exp, results)
    summary = SearchSummary(rows=rows, parent_run_id=callback.start_parent(),
                            tracking_uri=callback.tracking_uri, results=results)
    if search_interrupted(exp):
        summary.interrupted = True
        callback.end_parent("KILLED")
        return summary
    if searcher is not None:
        study = searcher.study
    dangling = 0 if study is None else close_dangling_trials(study)  # PBT: no study
    if dangling:
        summary.notes.append(
            f"{dangling} Optuna trial(s) left running (time budget, or lost with a killed "
            "driver): told PRUNED"
        )
    confirmed = confirm(exp, rows, results, callback, summary.notes)  # then releases Ray
    log_summary(callback, exp, rows, study, summary.notes)
    log_population(callback, exp)  # PBT/PB2: Ray's exploit log
    best = confirmed or champion_row(exp.search, rows, summary.notes)
    summary.best = best
    if exp.search.multi_objective:
        log_pareto(callback, exp, rows, best.trial_id if best is not None else None)
    if best is None:
        # no trial ran every task: FAILED; some did but none meets search.select: FINISHED
        # (`adaptune export --select` can still pick one)
        finished = any(r.status == "complete" for r in rows)
        if not finished:
            summary.notes.append("no trial ran every task: nothing registered")
        callback.end_parent("FINISHED" if finished else "FAILED")
        write_search_info(location, state="finished")
        return summary
    result = next(r for r in results if (r.metrics or {}).get("trial_id") == best.trial_id)
    if result.checkpoint is None:
        raise RuntimeError(f"trial {best.trial_id} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        summary.model_uri, summary.model_version = publish_champion(
            callback, exp, Path(ckpt), best.trial_id
        )
    for metric in exp.search.metrics:
        value = best.value if metric == exp.search.primary_metric else best.metrics.get(metric)
        if value is not None:
            callback.client.log_metric(summary.parent_run_id, f"best/{metric}", value)
    callback.end_parent("FINISHED")
    write_search_info(location, state="finished")
    return summary
