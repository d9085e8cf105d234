"""MLflow record of one ``adaptune train`` run: a standalone run, under no search.

It lives in the experiment's MLflow experiment (same tracking URI and experiment name as a
search of that experiment) with tag ``adaptune.kind`` = ``train``; params = every resolved
hyperparameter by its flat name (the names a trial's run uses), plus the model and the tasks;
metrics = everything the run reports after a task, at step = task index (online mode:
and each chunk's prequential loss as the series ``chunk_nll``, step = chunk index); the texts the
components wrote for a task (self-replay's samples) as ``<component>/task-<k>/<file>``; at the
end the loss matrix as JSON and as a heatmap (online mode: and ``prequential.png``). A resumed
run (``--resume``) continues the same MLflow run, whose id is kept in the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adaptune.search.experiment import Experiment, experiment_yaml
from adaptune.search.records import (
    checkpoint_texts,
    experiment_hash,
    get_or_create_experiment,
    git_commit,
    log_chunk_series,
    log_loss_matrix,
    log_prequential,
    log_task_texts,
    numeric_metrics,
    trial_params,
)
from adaptune.search.stores import check_tracking_server, resolve_tracking_uri
from adaptune.search.tags import (
    ERROR_TAG,
    GIT_COMMIT_TAG,
    HASH_TAG,
    KIND_TAG,
    KIND_TRAIN,
    TASKS_DONE_TAG,
)

RUN_ID_FILE = "mlflow_run.json"  # in the output folder: the run a --resume continues


def check_tracking(exp: Experiment) -> None:
    """Refuse an unreachable tracking server before anything is written.

    Raises:
        ConfigError: naming ``tracking.tracking_uri``.
    """
    check_tracking_server(resolve_tracking_uri(exp.tracking.tracking_uri, create=False))


def run_params(exp: Experiment) -> dict[str, str]:
    """Every hyperparameter's resolved value by its flat name (as a trial's run has them), the
    model and the tasks."""
    params = trial_params(exp.run.model_dump(mode="json"))
    params |= {"model": exp.run.model.name, "tasks": ",".join(t.name for t in exp.run.stream.tasks)}
    return {k: v[:6000] for k, v in params.items()}  # MLflow's longest param value


class TrainTracker:
    """Log one training run (see the module docstring).

    Args:
        exp: the experiment being trained.
        out: the run's output folder (where the run id is kept for ``--resume``).
    """

    def __init__(self, exp: Experiment, out: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.exp = exp
        self.out = out
        self.tracking_uri = resolve_tracking_uri(exp.tracking.tracking_uri)
        self.experiment_name = exp.tracking.experiment_name or exp.name
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id: str | None = None
        self._last: dict[str, Any] = {}  # the latest report (online mode: the chunks so far)

    def start(self, *, resume: bool) -> str:
        """Create the run (or, with ``resume``, reopen the one the output folder names)."""
        from mlflow.entities import Param

        kept = self.out / RUN_ID_FILE
        if resume and kept.is_file():
            self.run_id = str(json.loads(kept.read_text())["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return self.run_id
        experiment_id = get_or_create_experiment(
            self.client, self.experiment_name, self.tracking_uri
        )
        text = experiment_yaml(self.exp)
        tags = {KIND_TAG: KIND_TRAIN, HASH_TAG: experiment_hash(text)}
        commit = git_commit()
        if commit:
            tags[GIT_COMMIT_TAG] = commit
        run = self.client.create_run(experiment_id, run_name=f"train-{self.exp.name}", tags=tags)
        self.run_id = run.info.run_id
        self.client.log_batch(
            self.run_id, params=[Param(k, v) for k, v in run_params(self.exp).items()]
        )
        self.client.log_text(self.run_id, text, "experiment.yaml")
        kept.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))
        return self.run_id

    def log_task(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        """The metrics reported after a task, at step = task index, and the texts the
        components wrote into its ``checkpoint`` (``<component>/task-<k>/<file>``)."""
        from mlflow.entities import Metric
        from pyarrow import fs

        assert self.run_id is not None
        step, now = int(metrics["task_index"]), int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
        self.client.log_batch(self.run_id, metrics=values)
        log_chunk_series(self.client, self.run_id, metrics)  # online mode: the segment's chunks
        self._last = metrics
        if checkpoint is not None:
            texts = checkpoint_texts(fs.LocalFileSystem(), str(checkpoint.resolve()))
            log_task_texts(self.client, self.run_id, texts, step)

    def finish(self, loss_matrix: dict[str, Any], tasks_done: int) -> None:
        """The loss matrix (JSON and heatmap), then FINISHED (every task) or KILLED (stopped
        early with ``stop_after``, to be resumed)."""
        assert self.run_id is not None
        log_loss_matrix(self.client, self.run_id, loss_matrix)
        log_prequential(self.client, self.run_id, self._last, loss_matrix["tasks"])
        self.client.set_tag(self.run_id, TASKS_DONE_TAG, str(tasks_done))
        done = tasks_done >= len(loss_matrix["tasks"])
        self.client.set_terminated(self.run_id, status="FINISHED" if done else "KILLED")

    def fail(self, err: BaseException) -> None:
        """End the run FAILED (KILLED on Ctrl-C) with the error's first line as a tag."""
        if self.run_id is None:
            return
        if isinstance(err, KeyboardInterrupt):
            self.client.set_terminated(self.run_id, status="KILLED")
            return
        text = str(err).strip()
        line = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        self.client.set_tag(self.run_id, ERROR_TAG, line[:500])
        self.client.set_terminated(self.run_id, status="FAILED")
