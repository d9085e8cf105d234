"""The Python API: :func:`train` and :func:`search`, what ``adaptune train`` and
``adaptune search`` run, returning results instead of printing them.

Example:
    >>> from adaptune.search import train
    >>> result = train("experiments/quickstart.yaml", overrides={"lr": 3e-4}, quiet=True)
    ... # doctest: +SKIP
    >>> result.metrics["stream_loss"]  # doctest: +SKIP
    3.21
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptune.search.cli import format_matrix, naming_file
from adaptune.search.experiment import (
    Experiment,
    apply_overrides,
    load_experiment,
    parse_experiment,
    with_search_name,
)
from adaptune.trainables.errors import ConfigError

if TYPE_CHECKING:
    from adaptune.search.summary import SearchSummary

Overrides = Sequence[str] | Mapping[str, Any] | None


@dataclass
class RunResult:
    """One finished (or stopped) continual-learning run."""

    name: str  # the experiment's name
    tasks: list[str]  # task names, in stream order
    loss_matrix: list[list[float]]  # L[i][j]: row 0 before training, row i after task i
    metrics: dict[str, float]  # everything reported after the last task run
    task_metrics: list[dict[str, float]]  # one dict per task done, task 1 first
    out: Path  # the output folder (absolute): metrics.jsonl, loss_matrix.json, checkpoints/
    checkpoint_dir: Path | None  # the last task's checkpoint (``model/`` loads with transformers)
    run_id: str | None = None  # the MLflow run (None with ``tracking=False``)
    tracking_uri: str | None = None
    base_losses: list[float] = field(default_factory=list)  # the pretrain domain, per row
    # the retain domains (``run.stream.retain``), per row: one loss per domain, in their order
    retain_losses: list[list[float]] = field(default_factory=list)


@dataclass
class SearchResult:
    """One finished (or interrupted) search."""

    # one per trial, best first: trial_id, <metric> (each, then pareto), tasks_done, ...
    rows: list[dict[str, Any]]
    model_uri: str | None  # ``models:/NAME@champion``; None when no trial ran every task
    parent_run_id: str
    tracking_uri: str
    result_grid: Any  # Ray Tune's ``ResultGrid`` of the search
    summary: SearchSummary  # the same, as the command line prints it
    interrupted: bool = False

    def to_pandas(self) -> Any:
        """The trial table as a ``pandas.DataFrame``."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def _override_list(overrides: Overrides) -> list[str]:
    """``key=value`` strings; a mapping's values are written as JSON, which YAML reads back."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides: must be a list of 'key=value' strings or a dict (got {overrides!r})"
        )
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return [str(item) for item in overrides]


def resolve_experiment(
    experiment: Experiment | str | Path,
    overrides: Overrides = None,
    *,
    search_name: str | None = None,
) -> tuple[Experiment, str | None]:
    """The experiment with ``overrides`` applied, and the file it came from (if any).

    Args:
        experiment: an experiment file or a loaded :class:`Experiment`.
        overrides: ``key=value`` strings or a mapping (see :func:`train`).
        search_name: names the search (``--name``; see :func:`load_experiment`).

    Raises:
        ConfigError: a bad file, key or value, in one line.
    """
    items = _override_list(overrides)
    if not isinstance(experiment, Experiment):
        return load_experiment(experiment, items, search_name=search_name), str(experiment)
    if not items and search_name is None:
        return experiment, None
    data = apply_overrides(experiment.model_dump(mode="json", exclude_none=True), items)
    if search_name is not None:
        data = with_search_name(data, search_name)
    return parse_experiment(data, source="<experiment>"), None


@contextlib.contextmanager
def _naming(source: str | None) -> Iterator[None]:
    if source is None:
        yield
    else:
        with naming_file(source):
            yield


@contextlib.contextmanager
def _quiet_logs(quiet: bool) -> Iterator[None]:
    """With ``quiet``, no log record below WARNING from any library (MLflow's store set-up,
    Ray's start-up lines, Optuna's study). Ray sets its loggers' levels when it starts, so
    only logging's global switch holds them; the previous setting comes back afterwards."""
    if not quiet:
        yield
        return
    before = logging.root.manager.disable
    logging.disable(max(before, logging.INFO))
    try:
        yield
    finally:
        logging.disable(before)


def _print(quiet: bool, *args: Any, **kwargs: Any) -> None:
    if not quiet:
        print(*args, **kwargs)


def _resume_point(out: Path, resume: bool) -> Path | None:
    """The checkpoint a resumed run continues from; refuses to start over a finished run."""
    ckpts = out / "checkpoints"
    if resume:
        done = sorted(ckpts.glob("task-*"), key=lambda p: int(p.name.split("-")[1]))
        if not done:
            raise ConfigError(f"--resume: no checkpoint under {ckpts}")
        return done[-1]
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} already holds a run; pass --resume or another --out")
    return None


def train(
    experiment: Experiment | str | Path,
    *,
    overrides: Overrides = None,
    out: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    tracking: bool = True,
    quiet: bool = False,
) -> RunResult:
    """Run one continual-learning run with the experiment's fixed values (``space`` ignored).

    Args:
        experiment: an experiment file or a loaded :class:`Experiment`.
        overrides: ``["lr=3e-4", "run.stream.block_size=64"]`` or ``{"lr": 3e-4}``: a
            hyperparameter name or a dotted path, as ``--set`` takes them.
        out: the output folder (default ``runs/train/<name>``); it must be empty unless
            ``resume``. Checkpoints stay in ``<out>/checkpoints/task-<k>``.
        resume: continue from the last checkpoint in ``out``.
        stop_after: stop once this many tasks are done (continue later with ``resume``).
        tracking: log the run to MLflow (the experiment's ``tracking`` settings).
        quiet: print nothing.

    Returns:
        The loss matrix, the metrics and where the run's files and MLflow run are.

    Raises:
        ConfigError: bad input (one line naming the field), before anything is written.
        TrainingDivergedError: a NaN or infinite loss.
    """
    exp, source = resolve_experiment(experiment, overrides)
    with _quiet_logs(quiet):
        return _train(
            exp, source, Path(out or Path("runs") / "train" / exp.name),
            resume=resume, stop_after=stop_after, tracking=tracking, quiet=quiet,
        )


def _train(
    exp: Experiment,
    source: str | None,
    out: Path,
    *,
    resume: bool,
    stop_after: int | None,
    tracking: bool,
    quiet: bool,
) -> RunResult:
    """:func:`train` once the experiment is resolved."""
    from adaptune.search.records import extra_columns, matrix_record
    from adaptune.trainables.run import prepare, run_stream

    ckpts = out / "checkpoints"
    resume_from = _resume_point(out, resume)
    with _naming(source):  # every input check happens here, before any write
        prep = prepare(exp.run)
        if tracking:
            from adaptune.search.train_tracking import check_tracking

            check_tracking(exp)
    names = [t.name for t in prep.tasks]
    _print(
        quiet,
        f"adaptune train {exp.name}: {len(names)} tasks ({', '.join(names)}), "
        f"{sum(t.train_tokens for t in prep.tasks):,} train tokens, model {exp.run.model.name}",
    )
    out.mkdir(parents=True, exist_ok=True)
    tracker = None
    if tracking:
        from adaptune.search.train_tracking import TrainTracker

        tracker = TrainTracker(exp, out)
        tracker.start(resume=resume)
    start = time.perf_counter()

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        k = metrics["task_index"]
        dest = ckpts / f"task-{k}"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ckpt_dir, dest)
        _print(
            quiet,
            f"task {k}/{len(names)} {names[k - 1]:<16} stream_loss {metrics['stream_loss']:.4f}  "
            f"seen {metrics['seen_loss']:.4f}  forgetting {metrics['forgetting']:.4f}  "
            f"{metrics['train_tokens_per_s']:,.0f} tok/s  [{time.perf_counter() - start:.0f}s]",
            flush=True,
        )
        scalars = {k: v for k, v in metrics.items() if k not in ("loss_matrix", "retain_matrix")}
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(scalars) + "\n")
        if tracker is not None:
            tracker.log_task(metrics, dest)

    try:
        progress = run_stream(prep, report=report, resume_from=resume_from, stop_after=stop_after)
        matrix = matrix_record(
            names, progress.loss_matrix, base=progress.base_losses,
            retain=[r.name for r in prep.retain], retain_matrix=progress.retain_losses,
        )
        (out / "loss_matrix.json").write_text(json.dumps(matrix))
        if tracker is not None:
            tracker.finish(matrix, progress.tasks_done)
    except BaseException as err:
        if tracker is not None:
            tracker.fail(err)
        raise
    _print(quiet, "\nloss matrix (nats/token; row = after training on, column = evaluated on)")
    _print(quiet, format_matrix(progress.loss_matrix, names, None, extra_columns(matrix)))
    _print(quiet, f"\ncheckpoints: {ckpts}\nmetrics:     {out / 'metrics.jsonl'}")
    if tracker is not None:
        _print(quiet, f"mlflow:      {tracker.tracking_uri}  (run {tracker.run_id})")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    task_metrics = [json.loads(line) for line in lines if line.strip()]
    return RunResult(
        name=exp.name,
        tasks=names,
        loss_matrix=[list(r) for r in progress.loss_matrix],
        metrics=task_metrics[-1] if task_metrics else {},
        task_metrics=task_metrics,
        out=out.resolve(),
        checkpoint_dir=(
            (ckpts / f"task-{progress.tasks_done}").resolve() if progress.tasks_done else None
        ),
        run_id=tracker.run_id if tracker else None,
        tracking_uri=tracker.tracking_uri if tracker else None,
        base_losses=list(progress.base_losses),
        retain_losses=[list(r) for r in progress.retain_losses],
    )


def search(
    experiment: Experiment | str | Path,
    *,
    overrides: Overrides = None,
    name: str | None = None,
    resume: bool = False,
    address: str | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Run (or resume) a hyperparameter search: Ray Tune, Optuna, ASHA, MLflow.

    Args:
        experiment: an experiment file or a loaded :class:`Experiment`.
        overrides: as for :func:`train` (``{"search.num_samples": 4}``).
        name: the search's name: Ray folder, Optuna study, MLflow parent run (default: the
            experiment's; the MLflow experiment and registered model keep the file's name).
        resume: continue the interrupted search of this name.
        address: a running Ray cluster (default: start a local one).
        quiet: print nothing: neither our lines nor Ray Tune's progress table.

    Returns:
        The trials (best first), the champion's model URI and the MLflow parent run.

    Raises:
        ConfigError: bad input (one line naming the field), before Ray starts.
    """
    from adaptune.search.tuner import run_search

    exp, source = resolve_experiment(experiment, overrides, search_name=name)
    with _naming(source), _quiet_logs(quiet):
        summary = run_search(exp, address=address, resume=resume, quiet=quiet)
    s, rows = exp.search, []
    for r in summary.rows:
        # a multi-objective search: each objective's final value, and whether on the front
        values = (
            {**{m: r.metrics.get(m) for m in s.metrics}, "pareto": r.pareto}
            if s.multi_objective
            else {s.primary_metric: r.value}
        )
        rows.append({"trial_id": r.trial_id, **values, "tasks_done": r.tasks_done,
                     "status": r.status, **r.params})
    return SearchResult(
        rows=rows,
        model_uri=summary.model_uri,
        parent_run_id=summary.parent_run_id,
        tracking_uri=summary.tracking_uri,
        result_grid=summary.results,
        summary=summary,
        interrupted=summary.interrupted,
    )

