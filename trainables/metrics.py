"""Continual-learning metrics over the loss matrix (nats/token; lower is better).

``L[i][j]`` is the eval loss on task ``j`` (1-based) after training through task ``i``; row 0 is
the model before any training. Tasks are columns ``1..T``; the matrix is stored 0-based in
columns, so ``L[i][j - 1]`` is task ``j``. Means over an empty set (``forgetting`` and ``bwt`` at
task 1, ``fwt`` before task 2) are reported as 0.0 so every rung has a number.

Retain domains (``stream.retain``) are evaluated but never trained on: ``R[i][r]`` is the loss
on retain domain ``r`` (0-based) after task ``i``, row 0 again before any training.

Online mode (``stream.mode: online``) adds, after every segment, the prequential loss of the
chunks so far (each scored before any update on it) and, with the drift policy, how the detector
did against the known shift points (:func:`prequential_metrics`, :func:`drift_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Matrix = Sequence[Sequence[float]]
Direction = Literal["min", "max"]

# What a run reports after every task, each with the direction that is better. One list for
# the search's objective check, its default mode, and the columns the MLflow UI shows.
STREAM_METRICS: dict[str, Direction] = {  # the keys of stream_metrics()
    "stream_loss": "min",
    "seen_loss": "min",
    "new_task_loss": "min",
    "forgetting": "min",
    "bwt": "max",  # negative = forgetting
    "fwt": "max",
    "stream_ppl": "min",
    "seen_ppl": "min",
    "new_task_ppl": "min",
}
TASK_METRICS: dict[str, Direction] = {"loss": "min", "ppl": "min"}  # as f"{key}/{task name}"
BASE_METRICS: dict[str, Direction] = {"base_loss": "min", "base_ppl": "min"}  # with a pretrain
# With retain domains: the keys of retain_metrics(), and each domain's loss as f"retain/{name}".
# Alone, each favours a model that learns little of the stream; it measures the price paid.
RETAIN_METRICS: dict[str, Direction] = {
    "retain_loss": "min",
    "retain_ppl": "min",
    "retain_forgetting": "min",  # positive = forgot
}
RETAIN_DOMAIN_METRICS: dict[str, Direction] = {"retain": "min"}  # as f"retain/{domain name}"
# Online mode (stream.mode: online): the keys of prequential_metrics(), objectives there.
ONLINE_METRICS: dict[str, Direction] = {"prequential_loss": "min", "prequential_ppl": "min"}
# ... and, with the drift policy, the keys of drift_metrics(): not objectives (a detector that
# never fires has no delay, one that always fires has no misses).
DRIFT_METRICS: dict[str, Direction] = {
    "detections": "min",
    "shifts_detected": "max",
    "detection_delay": "min",  # tokens; absent until a shift is detected
    "false_alarms_per_10k": "min",
}
# `forgetting` is 0 after task 1, so every trial would tie at ASHA's first rung and a search
# optimising it would favour models that learn nothing: never an objective.
OBJECTIVES: dict[str, Direction] = {k: d for k, d in STREAM_METRICS.items() if k != "forgetting"}
# Shown beside the objective wherever trials are listed.
HEADLINE_METRICS = ("stream_loss", "seen_loss", "new_task_loss", "forgetting")
RETAIN_HEADLINE_METRICS = ("retain_loss", "retain_forgetting")  # beside them, with retain


def objectives(
    task_names: Sequence[str],
    *,
    pretrain: bool,
    retain_names: Sequence[str] = (),
    online: bool = False,
) -> dict[str, Direction]:
    """Every metric a search over this stream may optimise, with its better direction.

    Args:
        task_names: the stream's tasks, in order.
        pretrain: whether the run pretrains on a base domain (``base_loss`` is reported).
        retain_names: the stream's retain domains (``retain_loss`` is reported when any).
        online: whether the stream runs in online mode (``prequential_loss`` is reported).
    """
    allowed = dict(OBJECTIVES)
    allowed |= ONLINE_METRICS if online else {}
    for name in task_names:
        allowed |= {f"{key}/{name}": d for key, d in TASK_METRICS.items()}
    allowed |= BASE_METRICS if pretrain else {}
    if retain_names:
        allowed |= RETAIN_METRICS
    for name in retain_names:
        allowed |= {f"{key}/{name}": d for key, d in RETAIN_DOMAIN_METRICS.items()}
    return allowed


def direction(metric: str) -> Direction | None:
    """The better direction of the objective ``metric`` (``loss/<task>`` for any task name,
    ``retain/<domain>`` for any retain domain), or None when it is not an objective."""
    key, per_task, _ = metric.partition("/")
    if per_task:
        return TASK_METRICS.get(key) or RETAIN_DOMAIN_METRICS.get(key)
    return (
        OBJECTIVES.get(metric)
        or BASE_METRICS.get(metric)
        or RETAIN_METRICS.get(metric)
        or ONLINE_METRICS.get(metric)
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def stream_metrics(L: Matrix, k: int) -> dict[str, float]:
    """Metrics after training through task ``k`` (1-based), from rows ``0..k`` of ``L``.

    Returns ``stream_loss`` (mean over all T tasks, seen and unseen: the default objective),
    ``seen_loss``, ``new_task_loss``, ``forgetting`` (Chaudhry et al. 2018, loss form), ``bwt``,
    ``fwt`` and the perplexities ``exp(loss)`` beside the losses.
    """
    if not 1 <= k < len(L):
        raise ValueError(f"`1 <= k < len(L)` must hold, but got (k={k}, len(L)={len(L)})")
    T = len(L[0])

    def at(i: int, j: int) -> float:  # 1-based task j
        return float(L[i][j - 1])

    stream = _mean([at(k, j) for j in range(1, T + 1)])
    seen = _mean([at(k, j) for j in range(1, min(k, T) + 1)])
    new = at(k, k) if k <= T else float("nan")
    forgetting = _mean([at(k, j) - min(at(l, j) for l in range(j, k)) for j in range(1, k)])
    bwt = _mean([at(j, j) - at(k, j) for j in range(1, k)])
    fwt = _mean([at(0, j) - at(j - 1, j) for j in range(2, min(k, T) + 1)])
    return {
        "stream_loss": stream,
        "seen_loss": seen,
        "new_task_loss": new,
        "forgetting": forgetting,
        "bwt": bwt,
        "fwt": fwt,
        "stream_ppl": math.exp(stream),
        "seen_ppl": math.exp(seen),
        "new_task_ppl": math.exp(new),
    }


def task_forgetting(L: Matrix, k: int, j: int) -> float:
    """Forgetting of task ``j`` after task ``k``: ``L[k][j] - min_{l in [j, k)} L[l][j]``.

    0 when ``j >= k`` (the task is not in the past yet)."""
    if j >= k:
        return 0.0
    return float(L[k][j - 1]) - min(float(L[l][j - 1]) for l in range(j, k))


def retain_metrics(R: Matrix, k: int, names: Sequence[str]) -> dict[str, float]:
    """Metrics of the retain domains after task ``k``, from rows ``0..k`` of ``R``.

    Args:
        R: ``R[i][r]``: the loss on retain domain ``r`` after task ``i`` (row 0: before).
        k: tasks done (0 gives the values before training; ``retain_forgetting`` is then 0).
        names: the retain domains, in the order of ``R``'s columns; none gives ``{}``.

    Returns:
        ``retain_loss`` (mean over the domains), ``retain_ppl`` (its exp),
        ``retain_forgetting`` (``retain_loss`` now minus before the first task; positive =
        forgot) and ``retain/<name>`` (each domain's loss).
    """
    if not names:
        return {}
    if not 0 <= k < len(R) or len(R[k]) != len(names):
        raise ValueError(
            f"`0 <= k < len(R)` and one column per name must hold, but got "
            f"(k={k}, len(R)={len(R)}, names={list(names)})"
        )
    now = _mean([float(v) for v in R[k]])
    before = _mean([float(v) for v in R[0]])
    return {
        "retain_loss": now,
        "retain_ppl": math.exp(now),
        "retain_forgetting": now - before,
        **{f"retain/{name}": float(R[k][r]) for r, name in enumerate(names)},
    }


def prequential_metrics(
    chunk_nll: Sequence[float], chunk_blocks: Sequence[int]
) -> dict[str, float]:
    """The prequential (test-then-train) loss of an online stream so far.

    Args:
        chunk_nll: each chunk's mean next-token loss, measured before any update on it.
        chunk_blocks: each chunk's number of blocks (the stream's last chunk of a segment may
            be shorter), at least as long as ``chunk_nll``.

    Returns:
        ``prequential_loss``: the mean over every token scored so far (each chunk weighted by
        its blocks, so the plain mean of ``chunk_nll`` when the chunks are equal), and
        ``prequential_ppl``, its exp.
    """
    if not chunk_nll:
        raise ValueError("`len(chunk_nll) >= 1` must hold, but got an empty list")
    weights = list(chunk_blocks[: len(chunk_nll)])
    loss = sum(v * w for v, w in zip(chunk_nll, weights, strict=True)) / sum(weights)
    return {"prequential_loss": loss, "prequential_ppl": math.exp(loss)}


def drift_metrics(
    detections: Sequence[int], shifts: Sequence[int], tokens: int, *, window: float = math.inf
) -> dict[str, float]:
    """How a drift detector did against the stream's known shift points, all in tokens.

    A shift's detection is its first detection within ``window`` tokens after it and no later
    than the next shift (``shift < d <= min(shift + window, next shift)``); every other
    detection is a false alarm.

    Args:
        detections: token positions where the detector fired (the end of the chunk whose score
            set it off), ascending.
        shifts: token positions of the known shift points (where segments 2, 3, ... begin).
        tokens: tokens of the stream scored so far (the rate's denominator).
        window: how long after a shift a detection still counts as that shift's.

    Returns:
        ``detections`` (count), ``shifts_detected``, ``detection_delay`` (mean tokens from a
        shift to its detection; only when one was detected) and ``false_alarms_per_10k``.
    """
    bounds = [*shifts, math.inf]
    delays = []
    for shift, nxt in zip(bounds, bounds[1:], strict=False):
        end = min(shift + window, nxt)
        first = next((d for d in detections if shift < d <= end), None)
        if first is not None:
            delays.append(first - shift)
    out = {
        "detections": float(len(detections)),
        "shifts_detected": float(len(delays)),
        "false_alarms_per_10k": (len(detections) - len(delays)) / max(1, tokens) * 1e4,
    }
    if delays:
        out["detection_delay"] = _mean([float(d) for d in delays])
    return out
