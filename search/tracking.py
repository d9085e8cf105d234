"""MLflow tracking from the Tune driver: one parent run per search, one child run per trial.

Ray's ``MLflowLoggerCallback`` makes flat runs and, since Ray 2.10, uploads no artifacts. This
callback runs on the driver, so workers need no MLflow access:

- parent run: tags ``adaptune.experiment_hash`` (sha256 of the resolved experiment YAML), the git
  commit, the Optuna study, ``adaptune.searched`` (the searched names), ``adaptune.select``
  (the rule the champion is chosen by, :mod:`search.select`); params = the search settings
  (a list as ``a,b``); artifact ``experiment.yaml``.
- child run per trial (tag ``mlflow.parentRunId``, ``adaptune.trial_id``), looked up by tag before
  it is created so a restarted or resumed trial never gets a second one; named
  ``t<NN>-<trial id>`` (NN = its place among the search's trials: what tells trials apart comes
  first); params = every hyperparameter of the resolved run config by its flat name, searched
  or fixed; every numeric measurement as a metric at step = task index, and each searched
  number as ``hp/<name>`` (the value the task trained with: PBT changes it, params cannot
  change); ``adaptune.lineage`` (the trial that trained each task) and, after a PBT exploit,
  ``adaptune.pbt.donors``; a PBT trial's final history as ``lineage.json``; the settings the trial
  ran with (torch threads, CUDA or not) and where it last ran as tags (``adaptune.threads``,
  ``adaptune.cuda``, ``adaptune.node_id`` (Ray node), ``adaptune.node_ip``,
  ``adaptune.hostname``, ``adaptune.pid``); the texts the components wrote into a task's
  checkpoint (self-replay's samples) as ``<component>/task-<k>/<file>``, read from the
  checkpoint's storage; in online mode each chunk's prequential loss as the series
  ``chunk_nll`` (step = chunk index); at the end the loss matrix as JSON and as a heatmap
  (online mode: and ``prequential.png``), and status
  FINISHED (all tasks), KILLED (stopped early by the scheduler) or FAILED (tag
  ``adaptune.error`` = the error's type, first line and the task where it happened; artifact
  ``error.txt`` = the traceback). A trial that FailureConfig retries keeps its run
  (tag ``adaptune.failures`` = retries so far).
- a resumed search (``adaptune search --resume``) reuses the parent run (:meth:`resume_parent`)
  and every child: tag ``adaptune.starts`` counts the times Ray started a trial (1 unless it was
  retried or resumed). A trial Ray started but had not yet recorded when the driver died is
  lost to Ray; its run is adopted by the new trial that re-runs the same Optuna trial (same
  parameters), or ends KILLED with ``adaptune.error`` saying it was lost.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any

from adaptune.search.pbt import LINEAGE_ARTIFACT, hp_metrics, lineage_tags, log_lineage
from adaptune.search.records import (
    WHERE_TAGS,
    checkpoint_texts,
    experiment_hash,
    get_or_create_experiment,
    git_commit,
    log_chunk_series,
    log_loss_matrix,
    log_prequential,
    log_task_texts,
    matrix_record,
    numeric_metrics,
    run_name,
    trial_params,
)
from adaptune.search.select import objective_text, search_rule
from adaptune.search.stores import resolve_tracking_uri
from adaptune.search.tags import (
    ERROR_TAG,
    FAILURES_TAG,
    GIT_COMMIT_TAG,
    HASH_TAG,
    KIND_SEARCH,
    KIND_TAG,
    KIND_TRIAL,
    LAST_FAILURE_TAG,
    LOST_TAG,
    OBJECTIVE_TAG,
    PARENT_TAG,
    RESUMES_TAG,
    SEARCHED_TAG,
    SELECT_TAG,
    STARTS_TAG,
    TASKS_DONE_TAG,
    TRIAL_TAG,
)
from adaptune.spaces import Dist
from adaptune.trainables.errors import TrainingDivergedError
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

ERROR_ARTIFACT = "error.txt"  # Ray's error file: every failure with its traceback
logger = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _trial_exception(trial: Any) -> BaseException | None:
    """The exception a failed trial raised, unpickled from Ray's ``error.pkl``.

    At ``on_trial_error`` time Ray has written the file to the driver's staging directory
    (``trial.pickled_error_file``) but not yet synced it to storage, where
    ``trial.get_pickled_error()`` reads; try the staging copy first.
    """
    path = getattr(trial, "pickled_error_file", None)
    try:
        if path and Path(path).is_file():
            import cloudpickle

            with open(path, "rb") as f:
                return cloudpickle.load(f)  # type: ignore[no-any-return]
        getter = getattr(trial, "get_pickled_error", None)
        return getter() if callable(getter) else None
    except Exception:  # noqa: BLE001 - an unreadable error file must not stop the search
        return None


def _trial_traceback(trial: Any, exc: BaseException | None) -> str:
    """Ray's ``error.txt`` (every failure of the trial, each with its remote traceback)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return _ANSI.sub("", Path(path).read_text(errors="replace"))  # Ray colours the header
    if exc is not None:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "unknown error\n"


def describe_error(trial: Any, task_names: list[str]) -> tuple[str, str]:
    """A failed trial's error as (one line for the ``adaptune.error`` tag, the full traceback).

    The line is ``Type: message (during task k/T 'name')``. The task is the one after the
    trial's last report (``task_index``), which is where it was when it failed; a
    :class:`TrainingDivergedError` names its task and step itself.
    """
    exc = _trial_exception(trial)
    text = _trial_traceback(trial, exc)
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the trainable's exception
    if not isinstance(cause, BaseException):  # RayActorError (worker died) wraps no exception
        cause = exc
    if cause is not None:
        line = f"{type(cause).__name__}: {cause}"
    else:  # no pickle (e.g. the worker died): the last line of Ray's error text
        lines = [ln for ln in text.splitlines() if ln.strip()]
        line = lines[-1] if lines else "unknown error"
    line = next((ln for ln in line.splitlines() if ln.strip()), "unknown error")
    if not isinstance(cause, TrainingDivergedError):
        last = getattr(trial, "last_result", None) or {}
        done, total = int(last.get("task_index", 0)), len(task_names)
        where = (
            f"during task {done + 1}/{total} {task_names[done]!r}"
            if done < total
            else "after the last task"
        )
        line = f"{line} ({where})"
    return line[:500], text


class MlflowTrackingCallback(Callback):
    """Log a search to MLflow from the driver (see the module docstring).

    Args:
        exp: the :class:`search.experiment.Experiment` being searched.
        experiment_yaml: the resolved experiment as YAML (logged and hashed).
        extra_tags: more tags for the parent run (e.g. the Optuna storage).

    Example:
        >>> callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
        >>> tune.RunConfig(callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(
        self, exp: Any, *, experiment_yaml: str, extra_tags: dict[str, str] | None = None
    ) -> None:
        self.exp = exp
        self.experiment_yaml = experiment_yaml
        self.extra_tags = dict(extra_tags or {})
        self.tracking_uri = resolve_tracking_uri(exp.tracking.tracking_uri)
        self.experiment_name: str = exp.tracking.experiment_name or exp.name
        self.task_names = [t.name for t in exp.run.stream.tasks]
        self.param_names = list(exp.space)
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._children: dict[str, str] = {}
        self._listed: dict[str, Any] | None = None  # see _listing
        self._count = 0  # child runs of the parent, once listed
        self._client: MlflowClient | None = None

    # The Tuner pickles its callbacks; an open sqlite client must not travel with them, and an
    # unpickled copy (a resumed search) lists the children again.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_listed"] = None
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- parent ---------------------------------------------------------------------------------
    def start_parent(self) -> str:
        """Create the search's parent run once; returns its id."""
        if self.parent_run_id is not None:
            return self.parent_run_id
        self.experiment_id = get_or_create_experiment(
            self.client, self.experiment_name, self.tracking_uri
        )
        s = self.exp.search
        searched = [n for n, spec in self.exp.space.items() if isinstance(spec, Dist)]
        tags = {
            HASH_TAG: experiment_hash(self.experiment_yaml),
            KIND_TAG: KIND_SEARCH,
            OBJECTIVE_TAG: objective_text(s),
            SELECT_TAG: str(search_rule(s)),
            SEARCHED_TAG: ",".join(searched),
            **self.extra_tags,
        }
        commit = git_commit()
        if commit:
            tags[GIT_COMMIT_TAG] = commit
        run = self.client.create_run(
            self.experiment_id, run_name=f"search-{self.exp.name}", tags=tags
        )
        self.parent_run_id = run.info.run_id
        params = {f"search.{k}": v for k, v in s.model_dump(mode="json").items() if v is not None}
        params |= {f"resources.{k}": v for k, v in self.exp.resources.model_dump().items()}
        params |= {"tasks": ",".join(self.task_names), "model": self.exp.run.model.name}
        self.client.log_batch(
            self.parent_run_id,
            # a list (multi-objective metric and mode) as "a,b", as the UI reads it back
            params=[
                Param(k, ",".join(map(str, v)) if isinstance(v, list) else str(v))
                for k, v in params.items()
            ],
            synchronous=True,
        )
        self.client.log_text(self.parent_run_id, self.experiment_yaml, "experiment.yaml")
        return self.parent_run_id

    def resume_parent(self, run_id: str) -> str:
        """Reuse the parent run of an interrupted search (``--resume``); marks it RUNNING."""
        run = self.client.get_run(run_id)
        self.parent_run_id, self.experiment_id = run_id, str(run.info.experiment_id)
        resumes = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
        self.client.set_tag(run_id, RESUMES_TAG, str(resumes))
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def end_parent(self, status: str = "FINISHED") -> None:
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status=status)

    # -- children -------------------------------------------------------------------------------
    def child_run_id(self, trial: Any, trials: list[Any] | None = None) -> str:
        """The trial's child run: cached, else found by tag, else adopted from a lost trial
        (given Ray's ``trials``), else created (exactly once)."""
        trial_id = str(trial.trial_id)
        if trial_id in self._children:
            return self._children[trial_id]
        listed = self._listing().pop(trial_id, None)
        found = str(listed.info.run_id) if listed is not None else None
        adopted = self._adopt_lost_run(trial, trials) if not found and trials else None
        if found:
            run_id = found
            self.client.update_run(run_id, status="RUNNING")
        elif adopted:
            run_id = adopted
        else:
            tags = {PARENT_TAG: self.start_parent(), TRIAL_TAG: trial_id, KIND_TAG: KIND_TRIAL}
            self._count += 1
            run = self.client.create_run(
                self.experiment_id, run_name=run_name(self._count, trial_id), tags=tags
            )
            run_id = run.info.run_id
            params = trial_params(trial.config)
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        self._children[trial_id] = run_id
        return run_id

    def trial_run_id(self, trial_id: str) -> str | None:
        """The run of the trial ``trial_id`` in this search, if it has one (cached, else by tag)."""
        if trial_id in self._children:
            return self._children[trial_id]
        found = self._children_of_parent(f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
        return str(found[0].info.run_id) if found else None

    def _children_of_parent(self, where: str = "", max_results: int = 10_000) -> list[Any]:
        query = f"tags.`{PARENT_TAG}` = '{self.start_parent()}'"
        query += f" and {where}" if where else ""
        return list(self.client.search_runs([self.experiment_id], query, max_results=max_results))

    def _running_children(self) -> list[Any]:
        return self._children_of_parent("attributes.status = 'RUNNING'")

    def _listing(self) -> dict[str, Any]:
        """The runs of the parent's children that this copy has not handed out yet, by trial
        id, listed once: runs are created by the copy that Tune calls alone, so from then on
        the listing, ``_children`` and ``_count`` know every child without a query per trial
        (a query reads every child: one per trial makes a search quadratic in its trials)."""
        if self._listed is None:
            runs = self._children_of_parent()
            self._listed = {str(r.data.tags.get(TRIAL_TAG)): r for r in runs}
            self._count = len(runs)
        return self._listed

    def _adopt_lost_run(self, trial: Any, trials: list[Any]) -> str | None:
        """A RUNNING child whose Ray trial is gone and whose parameters are ``trial``'s.

        A driver killed after Ray started a trial but before Ray's next experiment snapshot
        leaves that trial's run behind, unknown to the resumed search; the searcher hands the
        same Optuna trial (same parameters) to a new Ray trial, which takes the run over.
        """
        live = {str(t.trial_id) for t in trials}
        params = trial_params(trial.config)
        listing = self._listing()
        for lost, run in list(listing.items()):
            running = run.info.status == RunStatus.to_string(RunStatus.RUNNING)
            if running and lost not in live and run.data.params == params:
                del listing[lost]
                run_id = run.info.run_id
                self.client.log_batch(
                    run_id, tags=[RunTag(TRIAL_TAG, str(trial.trial_id)), RunTag(LOST_TAG, lost)]
                )
                number = run.info.run_name.split("-", 1)[0].removeprefix("t")
                name = run_name(int(number) if number.isdigit() else 0, str(trial.trial_id))
                self.client.update_run(run_id, name=name)
                return str(run_id)
        return None

    def _finish(self, trial: Any, status: str, error: tuple[str, str] | None = None) -> None:
        run_id = self.child_run_id(trial)
        last = getattr(trial, "last_result", None) or {}
        matrix = last.get("loss_matrix")
        if matrix:
            retain = [r.name for r in self.exp.run.stream.retain]
            record = matrix_record(
                self.task_names, matrix, retain=retain, retain_matrix=last.get("retain_matrix")
            )
            log_loss_matrix(self.client, run_id, record)
        log_prequential(self.client, run_id, last, self.task_names)  # online mode only
        tags = [RunTag(TASKS_DONE_TAG, str(last.get("task_index", 0)))]
        failures = getattr(trial, "num_failures", 0)
        if failures:
            tags.append(RunTag(FAILURES_TAG, str(failures)))
        if error is not None:
            tags.append(RunTag(ERROR_TAG, error[0]))
            self.client.log_text(run_id, error[1], ERROR_ARTIFACT)
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)

    # -- Tune hooks -----------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self.start_parent()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id = self.child_run_id(trial, trials)
        starts = int(self.client.get_run(run_id).data.tags.get(STARTS_TAG, "0")) + 1
        self.client.set_tag(run_id, STARTS_TAG, str(starts))

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        run_id = self.child_run_id(trial)
        step = int(result.get("task_index", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        # the values this task trained with are the report's config: Tune hands the result to
        # the scheduler first, and a PBT exploit has replaced trial.config by the time we see it
        ran = result.get("config") or trial.config
        metrics += [Metric(k, v, now, step) for k, v in hp_metrics(self.exp, result, ran).items()]
        where = [RunTag(tag, str(result[k])) for k, tag in WHERE_TAGS.items() if k in result]
        where += [RunTag(k, v) for k, v in lineage_tags(result, str(trial.trial_id)).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=where)
        log_chunk_series(self.client, run_id, result)  # online mode: the segment's chunks

    def on_checkpoint(
        self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any
    ) -> None:
        # The texts the components wrote for the task just reported (self-replay samples);
        # Tune calls this after on_trial_result, so last_result is that task's report.
        step = int((getattr(trial, "last_result", None) or {}).get("task_index", 0))
        try:
            texts = checkpoint_texts(checkpoint.filesystem, checkpoint.path)
            log_task_texts(self.client, self.child_run_id(trial), texts, step)
        except Exception as err:  # noqa: BLE001 - Tune drops a checkpoint whose callback raised
            logger.warning("trial %s: component texts not logged: %s", trial.trial_id, err)
        try:  # PBT/PB2, after the last task: who trained each task with which values
            log_lineage(self.client, self.child_run_id(trial), self.exp, checkpoint, step)
        except Exception as err:  # noqa: BLE001 - as above
            logger.warning("trial %s: %s not logged: %s", trial.trial_id, LINEAGE_ARTIFACT, err)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = getattr(trial, "last_result", None) or {}
        done = int(last.get("task_index", last.get("training_iteration", 0)))
        status = "FINISHED" if done >= len(self.task_names) else "KILLED"
        self._finish(trial, status)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED", error=describe_error(trial, self.task_names))

    def on_trial_recover(
        self, iteration: int, trials: list[Any], trial: Any, **info: Any
    ) -> None:
        # FailureConfig retries the trial from its last checkpoint; its run stays RUNNING.
        run_id = self.child_run_id(trial)
        line, text = describe_error(trial, self.task_names)
        self.client.set_tag(run_id, FAILURES_TAG, str(getattr(trial, "num_failures", 1)))
        self.client.set_tag(run_id, LAST_FAILURE_TAG, line)
        self.client.log_text(run_id, text, ERROR_ARTIFACT)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials the search never finished (time budget, Ctrl-C) must not stay RUNNING.
        for run_id in self._children.values():
            if self.client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
                self.client.set_terminated(run_id, status="KILLED")
        # ... nor runs of trials lost with a killed driver that no resumed trial adopted.
        live = {str(t.trial_id) for t in trials}
        for run in self._running_children():
            if run.data.tags.get(TRIAL_TAG) not in live:
                why = "lost: the search driver died before Ray recorded this trial"
                self.client.set_tag(run.info.run_id, ERROR_TAG, why)
                self.client.set_terminated(run.info.run_id, status="KILLED")
