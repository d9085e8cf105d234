"""The MLflow records adaptune writes, whatever writes them: a search's trial runs (the Tune
callback in :mod:`adaptune.search.tracking`) and a standalone ``adaptune train`` run
(:mod:`adaptune.search.train_tracking`). Needs MLflow only on first use and never Ray, so
``adaptune train`` does not import Ray Tune to log its run.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from adaptune.search.stores import sqlite_file
from adaptune.search.tags import (
    CUDA_TAG,
    HOSTNAME_TAG,
    NODE_ID_TAG,
    NODE_IP_TAG,
    PID_TAG,
    THREADS_TAG,
)
from adaptune.spaces.paths import get_hp, get_path
from adaptune.trainables.config import HYPERPARAMETERS

# result field -> run tag: the settings a trial ran with (from the trainable) and where it ran
# (node_id from the trainable, the rest Ray's); numbers here are not measurements
WHERE_TAGS = {"threads": THREADS_TAG, "cuda": CUDA_TAG, "node_id": NODE_ID_TAG,
              "node_ip": NODE_IP_TAG, "hostname": HOSTNAME_TAG, "pid": PID_TAG}
# Ray's bookkeeping values that are numbers but not measurements
_SKIP = {"loss_matrix", "retain_matrix", "timestamp", "done", "should_checkpoint", "trial_id",
         *WHERE_TAGS}
# online mode: the per-chunk lists of a segment's report (trainables.online); chunk_nll becomes
# a metric series at step = chunk index, the rest mark the prequential plot
CHUNK_NLL = "chunk_nll"
_MAX_BATCH = 1000  # metrics per MLflow log_batch call


# a checkpoint's folder of component texts: <component>/<file> (the run writes it, see
# adaptune.trainables.components.base.ARTIFACTS_DIR; not imported here, it would load torch)
ARTIFACTS_DIR = "artifacts"


def experiment_hash(yaml_text: str) -> str:
    return hashlib.sha256(yaml_text.encode("utf-8")).hexdigest()


def git_commit(cwd: Path | None = None) -> str | None:
    """The current commit (with ``-dirty`` when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The MLflow experiment id; a local sqlite store keeps artifacts beside the database."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    db = sqlite_file(tracking_uri)
    if db is not None:
        location = (db.parent / "mlartifacts" / name).as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Every finite number in a Tune result (top level), minus Ray's bookkeeping values."""
    return {
        k: float(v)
        for k, v in result.items()
        if k not in _SKIP
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def searched_params(config: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The trial's values for ``names`` (flat hyperparameter names), read from the nested config."""
    return {name: get_hp(config, name) for name in names}


def trial_params(config: dict[str, Any]) -> dict[str, str]:
    """Every hyperparameter in a trial's resolved run config, searched or fixed, as MLflow
    params (flat name -> string; ``None`` as ``"None"``); names the config lacks are left out."""
    params = {}
    for name, path in HYPERPARAMETERS.items():
        with contextlib.suppress(KeyError, TypeError):
            params[name] = str(get_path(config, path))
    return params


def run_name(number: int, trial_id: str) -> str:
    """A trial run's name: ``t07-6f7d236e`` (its place in the search, then Ray's trial id)."""
    return f"t{number:02d}-{trial_id}"


def matrix_record(
    tasks: list[str],
    loss_matrix: list[list[float]],
    *,
    base: list[float] | None = None,
    retain: list[str] | None = None,
    retain_matrix: list[list[float]] | None = None,
) -> dict[str, Any]:
    """A run's ``loss_matrix.json``: ``tasks`` and ``loss_matrix`` (row 0 before training, row
    i after task i); ``base``, the pretrain domain's loss per row, when given; with retain
    domains, their names (``retain``) and ``retain_matrix`` (one row per row of the matrix, one
    loss per retain domain)."""
    record: dict[str, Any] = {"tasks": tasks, "loss_matrix": loss_matrix}
    if base is not None:
        record["base"] = base
    if retain:
        record |= {"retain": retain, "retain_matrix": retain_matrix or []}
    return record


def extra_columns(record: dict[str, Any]) -> dict[str, list[float]]:
    """The columns a loss matrix is shown with beside its tasks', label -> one loss per row:
    ``(base)`` (the pretrain domain) and ``retain/<name>`` (each retain domain)."""
    columns: dict[str, list[float]] = {}
    if record.get("base"):
        columns["(base)"] = list(record["base"])
    for r, name in enumerate(record.get("retain") or []):
        columns[f"retain/{name}"] = [row[r] for row in record.get("retain_matrix") or []]
    return columns


def loss_matrix_figure(
    matrix: list[list[float]],
    task_names: list[str],
    extra: dict[str, list[float]] | None = None,
) -> Any:
    """Heatmap of L[i][j]: rows = stage (before, after task i), columns = evaluated task, then
    the ``extra`` columns (:func:`extra_columns`) behind a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = extra or {}
    labels = [*task_names, *extra]
    cells = [[*row, *(col[i] for col in extra.values())] for i, row in enumerate(matrix)]
    rows = ["before", *(f"after {n}" for n in task_names[: len(matrix) - 1])]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(cells, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    if extra:  # trained tasks on the left, never-trained domains on the right
        ax.axvline(len(task_names) - 0.5, color="w", linewidth=3)
    lo, hi = im.get_clim()
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            ink = "w" if v > (lo + hi) / 2 else "k"  # viridis_r: high losses are the dark cells
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=ink, fontsize=8)
    fig.colorbar(im, ax=ax, label="loss (nats/token)")
    fig.tight_layout()
    return fig


def log_loss_matrix(client: Any, run_id: str, record: dict[str, Any]) -> None:
    """A run's ``record`` (:func:`matrix_record`) as ``loss_matrix.json``, and the matrix's
    heatmap, extra columns included, as ``loss_matrix.png``."""
    import matplotlib.pyplot as plt

    client.log_dict(run_id, record, "loss_matrix.json")
    fig = loss_matrix_figure(record["loss_matrix"], record["tasks"], extra_columns(record))
    client.log_figure(run_id, fig, "loss_matrix.png")
    plt.close(fig)


def checkpoint_texts(filesystem: Any, checkpoint_path: str) -> dict[str, str]:
    """The texts components wrote into a checkpoint (``Component.artifacts``), as
    ``"<component>/<file>"`` -> text; ``filesystem`` is a pyarrow filesystem (a Tune
    checkpoint's own, or the local one), so shared storage (S3, NFS) reads like a folder."""
    from pyarrow import fs

    root = f"{checkpoint_path.rstrip('/')}/{ARTIFACTS_DIR}"
    selector = fs.FileSelector(root, allow_not_found=True, recursive=True)
    texts = {}
    for info in filesystem.get_file_info(selector):
        if info.type == fs.FileType.File:
            with filesystem.open_input_stream(info.path) as f:
                texts[info.path[len(root) + 1 :]] = f.read().decode("utf-8")
    return texts


def log_task_texts(client: Any, run_id: str, texts: dict[str, str], step: int) -> None:
    """Each text of :func:`checkpoint_texts` as the artifact ``<component>/task-<step>/<file>``
    (a task's self-replay samples: ``self_replay/task-2/samples.txt``)."""
    for rel, text in sorted(texts.items()):
        component, _, file = rel.partition("/")
        client.log_text(run_id, text, f"{component}/task-{step}/{file}")


def chunk_series(result: dict[str, Any]) -> list[tuple[int, float]]:
    """(chunk index, score) for the chunks of the segment a report closes (none outside online
    mode): what a tracker logs as the ``chunk_nll`` series, each chunk once."""
    nll, bounds = result.get(CHUNK_NLL), result.get("chunk_boundaries")
    if not nll or not bounds:
        return []
    k = int(result.get("task_index", len(bounds) - 1))
    lo, hi = bounds[k - 1], min(bounds[k], len(nll))
    return [(i, float(nll[i])) for i in range(lo, hi) if math.isfinite(nll[i])]


def log_chunk_series(client: Any, run_id: str, result: dict[str, Any]) -> None:
    """Log :func:`chunk_series` as the metric ``chunk_nll`` at step = chunk index."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(CHUNK_NLL, v, now, i) for i, v in chunk_series(result)]
    for i in range(0, len(values), _MAX_BATCH):
        client.log_batch(run_id, metrics=values[i : i + _MAX_BATCH])


def prequential_figure(result: dict[str, Any], task_names: list[str]) -> Any:
    """Each chunk's prequential loss against its index, the segments' boundaries as dashed
    lines (labelled with their tasks), drift detections as red triangles and the chunks
    trained on as ticks along the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nll = [float(v) for v in result[CHUNK_NLL]]
    bounds = list(result.get("chunk_boundaries") or [0, len(nll)])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(range(len(nll)), nll, color="C0", linewidth=1.2, marker=".", label="chunk NLL")
    for k, name in enumerate(task_names[: len(bounds) - 1]):
        if bounds[k] >= len(nll):
            break
        if k:
            ax.axvline(bounds[k] - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.annotate(name, (bounds[k] - 0.4, 1.0), xycoords=("data", "axes fraction"),
                    va="top", fontsize=8, color="grey")
    lo = min(nll)
    updates = [i for i in result.get("chunk_updates") or [] if i < len(nll)]
    if updates:
        ax.plot(updates, [lo] * len(updates), "|", color="C2", markersize=8, label="trained on")
    hits = [i for i in result.get("chunk_detections") or [] if i < len(nll)]
    if hits:
        ax.plot(hits, [nll[i] for i in hits], "v", color="C3", markersize=8, label="drift")
    ax.set_xlabel("chunk (in stream order)")
    ax.set_ylabel("NLL before training on it (nats/token)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def log_prequential(client: Any, run_id: str, result: dict[str, Any], tasks: list[str]) -> None:
    """``prequential.png`` (:func:`prequential_figure`) for a report that has chunk scores."""
    if not result.get(CHUNK_NLL):
        return
    import matplotlib.pyplot as plt

    fig = prequential_figure(result, tasks)
    client.log_figure(run_id, fig, "prequential.png")
    plt.close(fig)
