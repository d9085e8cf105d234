"""The Pareto set of a multi-objective search, and what the parent run gets from it.

Only trials that ran every task compete (a trial ASHA stopped has no final values), and only
those with a finite value for every objective. A trial is on the front when no other trial is at
least as good on every objective and strictly better on one. Trials with equal values on every
objective do not dominate each other, so duplicates are all on the front (or all off it).

After the search the parent run gets ``pareto.md`` and ``pareto.csv`` (the front: trial, each
objective, the searched values, the champion marked), ``pareto_front.png`` (two objectives: every
finished trial with the front drawn as a staircase; more than two: one panel per pair of
objectives, the front computed over all of them, so a front point can look dominated in one
panel) and the tag ``adaptune.pareto_trials``; each front trial's child run gets the tag
``adaptune.pareto`` = ``true``, and no other run of the search keeps it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaptune.search.tags import PARENT_TAG, PARETO_TAG, PARETO_TRIALS_TAG

PNG = "pareto_front.png"


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    signs = [1.0 if m == "min" else -1.0 for m in modes]
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b, strict=True)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_front(points: Mapping[str, Sequence[float]], modes: Sequence[str]) -> list[str]:
    """The ids of the non-dominated points, in the order given.

    Args:
        points: id -> one value per objective (finite).
        modes: ``"min"`` or ``"max"`` per objective.

    Example:
        >>> pareto_front({"a": [1, 5], "b": [2, 2], "c": [3, 3]}, ["min", "min"])
        ['a', 'b']
    """
    return [
        i
        for i, p in points.items()
        if not any(dominates(q, p, modes) for j, q in points.items() if j != i)
    ]


def objective_points(rows: Sequence[Any], metrics: Sequence[str]) -> dict[str, list[float]]:
    """trial id -> its final value per objective, for the rows that ran every task and have a
    finite value for each (``rows``: :class:`search.summary.TrialRow`)."""
    points = {}
    for r in rows:
        values = [r.metrics.get(m) for m in metrics]
        finite = all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        if r.status == "complete" and finite:
            points[r.trial_id] = [float(v) for v in values]  # type: ignore[arg-type]
    return points


def mark_pareto(rows: Sequence[Any], metrics: Sequence[str], modes: Sequence[str]) -> None:
    """Set ``row.pareto`` on every row: True for the trials on the front."""
    front = set(pareto_front(objective_points(rows, metrics), modes))
    for r in rows:
        r.pareto = r.trial_id in front


def pareto_table(
    rows: Sequence[Any], metrics: Sequence[str], champion: str | None, *, csv: bool = False
) -> str:
    """The front as a markdown table (or CSV): trial, each objective, the searched values,
    and ``*`` in the ``champion`` column of the registered trial."""
    front = [r for r in rows if r.pareto]
    names = list(front[0].params) if front else []
    head = ["trial", *metrics, *names, "champion"]
    body = [
        [
            r.trial_id,
            *(repr(r.metrics[m]) if csv else f"{r.metrics[m]:.4f}" for m in metrics),
            *(str(r.params[n]) for n in names),
            "*" if r.trial_id == champion else "",
        ]
        for r in front
    ]
    if csv:
        return "\n".join(",".join(line) for line in [head, *body]) + "\n"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body]) + "\n"


def pareto_figure(
    rows: Sequence[Any], metrics: Sequence[str], modes: Sequence[str], champion: str | None
) -> Any:
    """Every finished trial in objective space, the front highlighted, the champion starred.

    Two objectives: one scatter with the front as a staircase. More: one panel per pair.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = objective_points(rows, metrics)
    front = {r.trial_id for r in rows if r.pareto}
    pairs = list(itertools.combinations(range(len(metrics)), 2))
    cols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs, strict=False):
        others = [p for t, p in points.items() if t not in front]
        on = sorted((p for t, p in points.items() if t in front), key=lambda p: (p[i], p[j]))
        if others:
            ax.scatter([p[i] for p in others], [p[j] for p in others], c="0.6", label="dominated")
        if on:
            ax.scatter([p[i] for p in on], [p[j] for p in on], c="C3", label="Pareto front")
            if len(metrics) == 2:
                # the dominated region's edge: between two front points it stays at the
                # better-x one's level, which is the left point when x is minimised
                where = "post" if modes[i] == "min" else "pre"
                ax.step([p[i] for p in on], [p[j] for p in on], where=where, c="C3", lw=1)
        if champion in points:
            c = points[champion]
            ax.scatter([c[i]], [c[j]], marker="*", s=250, c="gold", edgecolors="k",
                       label="champion", zorder=3)
        ax.set_xlabel(f"{metrics[i]} ({modes[i]})")
        ax.set_ylabel(f"{metrics[j]} ({modes[j]})")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    fig.suptitle("trials that ran every task (final values)")
    fig.tight_layout()
    return fig


def log_pareto(callback: Any, exp: Any, rows: Sequence[Any], champion: str | None) -> list[str]:
    """Tag the front's child runs and log the front's table and figure on the parent run.

    Args:
        callback: the search's :class:`search.tracking.MlflowTrackingCallback`.
        exp: the experiment (its ``search.metrics`` and ``search.modes``).
        rows: the trials (:func:`search.summary.trial_rows`, ``pareto`` set).
        champion: the registered trial's id, if any.

    Returns:
        The front's trial ids.
    """
    import matplotlib.pyplot as plt

    client, parent = callback.client, callback.start_parent()
    metrics, modes = exp.search.metrics, exp.search.modes
    front = [r.trial_id for r in rows if r.pareto]
    runs = {t: callback.trial_run_id(t) for t in front}
    for run_id in runs.values():
        if run_id is not None:
            client.set_tag(run_id, PARETO_TAG, "true")
    # a resumed search's front may have moved: the tag stays on the current front only
    stale = client.search_runs(
        [callback.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{PARETO_TAG}` = 'true'",
        max_results=10_000,
    )
    for run in stale:
        if run.info.run_id not in runs.values():
            client.delete_tag(run.info.run_id, PARETO_TAG)
    client.set_tag(parent, PARETO_TRIALS_TAG, ",".join(front))
    client.log_text(parent, pareto_table(rows, metrics, champion), "pareto.md")
    client.log_text(parent, pareto_table(rows, metrics, champion, csv=True), "pareto.csv")
    fig = pareto_figure(rows, metrics, modes, champion)
    client.log_figure(parent, fig, PNG)
    plt.close(fig)
    return front
