"""A finished search in rows: one per trial, best first; as a table, a plot, on the parent run."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptune.search.experiment import Experiment
from adaptune.search.pareto import mark_pareto
from adaptune.search.records import searched_params
from adaptune.search.tracking import MlflowTrackingCallback


@dataclass
class TrialRow:
    trial_id: str
    value: float | None  # objective at the trial's last result
    tasks_done: int
    status: str  # "complete", "stopped" (by ASHA), "error"
    params: dict[str, Any]
    # what the trial cost, from its last report (trainables.cost); None when it never reported
    params_trainable: int | None = None
    params_total: int | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None  # only on CUDA
    retain_forgetting: float | None = None  # with retain domains: what the model lost of them
    # every finite number of the trial's last result (what a selection rule reads)
    metrics: dict[str, float] = field(default_factory=dict)
    pareto: bool = False  # multi-objective: on the Pareto front (:mod:`search.pareto`)
    # search.confirm: the configuration over seeds (:class:`search.confirm.ConfirmStats`)
    confirmed: Any = None


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
    results: Any = None  # Ray Tune's ResultGrid from fit()


def trial_rows(exp: Experiment, results: Any) -> list[TrialRow]:
    """One row per trial, complete trials first, each group best first."""
    T, s = len(exp.run.stream.tasks), exp.search
    rows = []
    for r in results:
        m = r.metrics or {}
        done = int(m.get("task_index", 0))
        value = m.get(s.primary_metric)
        value = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        status = "error" if r.error else "complete" if done >= T else "stopped"
        rows.append(
            TrialRow(
                trial_id=str(m.get("trial_id") or Path(r.path).name.removeprefix("trial-")),
                value=value,
                tasks_done=done,
                status=status,
                params=searched_params(r.config, list(exp.space)),
                params_trainable=_number(m.get("params_trainable"), int),
                params_total=_number(m.get("params_total"), int),
                peak_rss_mb=_number(m.get("peak_rss_mb"), float),
                peak_gpu_mb=_number(m.get("peak_gpu_mb"), float),
                retain_forgetting=_number(m.get("retain_forgetting"), float),
                metrics={k: float(v) for k, v in m.items() if _number(v, float) is not None},
            )
        )
    if s.multi_objective:
        mark_pareto(rows, s.metrics, s.modes)
    sign = 1 if s.primary_mode == "min" else -1

    def key(row: TrialRow) -> tuple[int, float]:
        group = {"complete": 0, "stopped": 1, "error": 2}[row.status]
        return (group, sign * row.value if row.value is not None else math.inf)

    return sorted(rows, key=key)


def format_table(
    rows: list[TrialRow], metric: str | list[str], *, markdown: bool = False
) -> str:
    """Trials as a text (or markdown) table: the objective (several: each, then ``pareto``
    with ``*`` on the front), the searched values, ``retain_forgetting`` when the stream has
    retain domains (and it is not an objective), then what each trial cost (``params``
    trainable/total, peak resident memory, peak GPU memory when any trial had one; MiB)."""
    objectives = [metric] if isinstance(metric, str) else list(metric)
    names = list(rows[0].params) if rows else []
    gpu = any(r.peak_gpu_mb is not None for r in rows)
    retain = "retain_forgetting" not in objectives and any(
        r.retain_forgetting is not None for r in rows
    )
    multi = len(objectives) > 1
    confirmed = any(r.confirmed is not None for r in rows)  # search.confirm: mean±std (runs)
    head = ["rank", "trial", *objectives, *(["pareto"] if multi else [])]
    head += ["mean±std (n)"] if confirmed else []
    head += ["tasks", "status", *names]
    head += ["retain_forgetting"] if retain else []
    head += ["params", "rss_mb", *(["gpu_mb"] if gpu else [])]
    body = [
        [
            str(i),
            r.trial_id,
            *(_objective_cells(r, objectives)),
            *([r.confirmed.text() if r.confirmed is not None else "-"] if confirmed else []),
            str(r.tasks_done),
            r.status,
            *(_fmt(r.params[n]) for n in names),
            *([_fmt(r.retain_forgetting) if r.retain_forgetting is not None else "-"]
              if retain else []),
            _params(r),
            _mib(r.peak_rss_mb),
            *([_mib(r.peak_gpu_mb)] if gpu else []),
        ]
        for i, r in enumerate(rows, start=1)
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max([len(c), *(len(b[i]) for b in body)]) for i, c in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def _objective_cells(r: TrialRow, objectives: list[str]) -> list[str]:
    if len(objectives) == 1:
        return [f"{r.value:.4f}" if r.value is not None else "-"]
    values = [r.metrics.get(m) for m in objectives]
    return [f"{v:.4f}" if v is not None else "-" for v in values] + ["*" if r.pareto else ""]


def _confirm_cells(r: TrialRow) -> list[str]:
    """A row's ``<metric>_mean``, ``_std`` and ``_n`` csv cells (empty when not confirmed)."""
    stats = r.confirmed
    return ["", "", ""] if stats is None else [repr(stats.mean()), repr(stats.std()), str(stats.n)]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _number(v: Any, kind: type[int] | type[float]) -> Any:
    """``v`` as ``kind`` when it is a finite number, else None."""
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return kind(v) if ok else None


def _count(n: int) -> str:
    """A parameter count in three significant digits: ``460K``, ``124M``, ``1.24B``."""
    if n < 1000:
        return str(n)
    for size, suffix in ((1e3, "K"), (1e6, "M")):
        text = f"{n / size:.3g}"
        if "e" not in text:  # 999,999 is "1e+03" K: it is 1M
            return text + suffix
    return f"{n / 1e9:.3g}B"


def _params(r: TrialRow) -> str:
    if r.params_trainable is None or r.params_total is None:
        return "-"
    return f"{_count(r.params_trainable)}/{_count(r.params_total)}"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


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


def log_summary(
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
    s = exp.search
    metric = s.primary_metric
    client.log_text(parent, format_table(rows, s.metric, markdown=True), "trials.md")
    buf = io.StringIO()
    names = list(rows[0].params) if rows else []
    costs = ["params_trainable", "params_total", "peak_rss_mb", "peak_gpu_mb"]
    objectives = [*s.metrics, "pareto"] if s.multi_objective else [metric]
    confirm = [r.confirmed.metric for r in rows if r.confirmed is not None][:1]  # search.confirm
    objectives += [f"{confirm[0]}_{x}" for x in ("mean", "std", "n")] if confirm else []
    buf.write(",".join(["trial_id", *objectives, "tasks_done", "status", *names, *costs]) + "\n")
    for r in rows:
        values = [r.metrics.get(m) for m in s.metrics] if s.multi_objective else [r.value]
        cells = [r.trial_id, *("" if v is None else repr(v) for v in values)]
        cells += [str(r.pareto).lower()] if s.multi_objective else []
        cells += _confirm_cells(r) if confirm else []
        cells += [str(r.tasks_done), r.status]
        cells += [str(r.params[n]) for n in names]
        cells += ["" if getattr(r, c) is None else str(getattr(r, c)) for c in costs]
        buf.write(",".join(cells) + "\n")
    client.log_text(parent, buf.getvalue(), "trials.csv")
    fig = _objective_plot(rows, metric)
    client.log_figure(parent, fig, "objective_per_trial.png")
    plt.close(fig)

    if study is None:  # PBT/PB2: values change mid-trial, and no Optuna study holds them
        notes.append("parameter importances skipped: a population search has no Optuna study")
        return
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        notes.append(f"parameter importances skipped: {len(complete)} complete trial(s), need 2")
        return
    try:
        importances = _importances(study, s.metrics)
    except (ValueError, RuntimeError) as err:
        notes.append(f"parameter importances skipped: {err}")
        return
    client.log_dict(parent, importances, "param_importances.json")
    from mlflow.entities import Metric

    client.log_batch(
        parent, metrics=[Metric(f"importance/{k}", float(v), 0, 0) for k, v in importances.items()]
    )


def _importances(study: Any, metrics: list[str]) -> dict[str, float]:
    """Optuna's parameter importances: ``{param: value}``; a multi-objective study has them
    per objective, as ``{"metric/param": value}``."""
    import warnings

    import optuna

    if len(metrics) == 1:
        return dict(optuna.importance.get_param_importances(study))
    out: dict[str, float] = {}
    for i, (metric, direction) in enumerate(zip(metrics, study.directions, strict=True)):
        # Optuna ranks a `target` as lower-is-better (and warns so): negate a maximised one
        sign = 1.0 if direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*low `target` values")
            found = optuna.importance.get_param_importances(
                study, target=lambda t, i=i, sign=sign: sign * t.values[i]
            )
        out |= {f"{metric}/{k}": v for k, v in found.items()}
    return out
