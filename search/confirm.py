"""Confirming the champion over seeds (``search.confirm: {top_k, seeds}``): the pure part.

A small model's final loss moves with its seed (initial weights, batch order, every component's
draws) by as much as the gap between a search's best trials, so one run per configuration can
crown a lucky seed. With ``search.confirm``, once the trials end:

1. the best ``top_k`` configurations among the trials that ran every task, ranked by the
   search's selection rule (``search.select``, else the first objective; :mod:`search.select`),
   run again with ``seeds`` further seeds each: the trial's own ``run.seed`` (its searched
   value when ``seed`` is in the space) + 1, + 2, ... + ``seeds``. Every other value, the
   data split (``run.stream.data_seed``) included, stays the trial's;
2. each of them is scored by the MEAN over its original trial and its confirmation runs that
   ran every task, of each metric the rule reads; the rule picks among those means (its
   ``where`` conditions hold on the means), ties broken as in :func:`search.select.choose`.
   A configuration with a confirmation run that failed ranks after every configuration whose
   runs all finished;
3. the champion is that configuration's ORIGINAL trial: its final checkpoint is registered and
   ``adaptune export`` writes its values and seed, so the registered model and ``best.yaml``
   are the same run (any of the seeds would do; the original is the one the search recorded).

The Ray part (the second Tune fit and its MLflow child runs) is :mod:`search.confirm_run`;
this module needs neither Ray nor MLflow, so the checks and the dry run load neither.

Example:
    >>> runs = lambda *v: tuple({"stream_loss": x} for x in v)
    >>> a = ConfirmStats("a", "stream_loss", "min", (0, 1), runs(2.0, 2.6))
    >>> b = ConfirmStats("b", "stream_loss", "min", (0, 1), runs(2.1, 2.2))
    >>> confirmed_winner({"a": a, "b": b}, Rule("min", "stream_loss"))
    'b'
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adaptune.search.experiment import Experiment
from adaptune.search.pbt import is_population
from adaptune.search.select import Rule, choose, search_rule
from adaptune.spaces.paths import get_hp, set_hp

CONFIRM_DIR = "confirm"  # the confirmation fit's Ray folder, inside the search's
CONFIRM_TABLE = "confirm.md"  # on the parent run: every confirmed configuration, run by run


@dataclass(frozen=True)
class ConfirmPlan:
    """One confirmation run: the values of trial ``trial_id`` with another seed."""

    trial_id: str
    seed: int
    config: dict[str, Any]  # the run config Ray hands the trainable


@dataclass(frozen=True)
class ConfirmStats:
    """One configuration over its seeds: the original trial first, then each confirmation run
    that ran every task."""

    trial_id: str
    metric: str  # the rule's metric: what the table shows
    mode: str  # its better direction: "min" or "max"
    seeds: tuple[int, ...]
    runs: tuple[Mapping[str, float], ...]  # the final metrics of each run, as ``seeds``
    failed: tuple[int, ...] = field(default=())  # seeds whose run did not run every task

    def values(self, metric: str | None = None) -> list[float]:
        """The finite values of ``metric`` (default: :attr:`metric`), run by run."""
        name = metric or self.metric
        return [float(r[name]) for r in self.runs if _finite(r.get(name))]

    def mean(self, metric: str | None = None) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str | None = None) -> float | None:
        """The sample standard deviation (n - 1); 0 for one run."""
        values = self.values(metric)
        if not values:
            return None
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def n(self) -> int:
        return len(self.values())

    def text(self) -> str:
        """``2.3167±0.0306 (3)``: mean ± std (runs), as the summary table shows it."""
        mean, std = self.mean(), self.std()
        if mean is None or std is None:
            return "-"
        return f"{mean:.4f}±{std:.4f} ({self.n})"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def confirm_problems(exp: Experiment) -> list[str]:
    """``search.confirm`` needs configurations that stay fixed along the stream, and at most
    as many as the search runs: one line per problem (:mod:`search.checks` raises them)."""
    c = exp.search.confirm
    if c is None:
        return []
    if is_population(exp):
        return [
            f"search.confirm: {exp.search.algorithm} trials copy other trials and change their "
            "values mid-stream, so there is no one configuration to re-run; remove "
            "search.confirm or use search.algorithm tpe or random"
        ]
    if c.top_k > exp.search.num_samples:
        return [
            f"search.confirm.top_k: must be <= search.num_samples ({exp.search.num_samples}), "
            f"the trials it picks from (got {c.top_k})"
        ]
    return []


def describe_confirm(exp: Experiment, T: int) -> list[str]:
    """The dry run's line: what confirmation will run, and what it costs."""
    c, s = exp.search.confirm, exp.search
    if c is None:
        return []
    runs = c.top_k * c.seeds
    return [
        f"confirm:    the best {c.top_k} configuration(s) by {search_rule(s)}, each re-run with "
        f"{c.seeds} more seed(s): the trial's seed + 1 .. + {c.seeds}",
        f"  cost      {c.top_k} x {c.seeds} = {runs} runs of all {T} tasks after the trials: "
        f"{runs * T} task trainings more (the {s.num_samples} trials train at most "
        f"{s.num_samples * T})",
        f"  champion  the best mean over {c.seeds + 1} runs; its original trial's checkpoint is "
        "registered",
    ]


def final_values(search: Any, row: Any) -> dict[str, float]:
    """A summary row's final metrics, its objective value included (what a rule reads)."""
    values = dict(row.metrics)
    if row.value is not None:
        values.setdefault(search.primary_metric, row.value)
    return values


def _order(search: Any) -> list[tuple[str, str]]:
    return list(zip(search.metrics, search.modes, strict=False))


def top_configurations(search: Any, rows: Sequence[Any], k: int) -> list[str]:
    """The ids of the best ``k`` trials that ran every task, best first, as the selection rule
    ranks them (:func:`search.select.choose`, applied again without each pick); trials that
    do not meet the rule's conditions are left out.

    Args:
        search: the :class:`search.experiment.SearchConfig`.
        rows: :class:`search.summary.TrialRow` objects.
        k: how many.
    """
    rule, order = search_rule(search), _order(search)
    done = {r.trial_id: final_values(search, r) for r in rows if r.status == "complete"}
    picked: list[str] = []
    while len(picked) < k:
        best = choose(done, rule, order)
        if best is None:
            break
        picked.append(best)
        del done[best]
    return picked


def confirm_plans(
    picked: Sequence[str], configs: Mapping[str, Mapping[str, Any]], seeds: int
) -> list[ConfirmPlan]:
    """``seeds`` runs of each picked trial's config, seeded its own ``run.seed`` + 1 .. + seeds.

    Args:
        picked: trial ids (:func:`top_configurations`).
        configs: trial id -> the run config it trained with (Ray's ``trial.config``).
        seeds: the runs per configuration.
    """
    plans = []
    for trial_id in picked:
        base = configs[trial_id]
        for i in range(1, seeds + 1):
            config = copy.deepcopy(dict(base))
            seed = int(get_hp(config, "seed")) + i
            set_hp(config, "seed", seed)
            plans.append(ConfirmPlan(trial_id, seed, config))
    return plans


def confirmed_winner(
    stats: Mapping[str, ConfirmStats], rule: Rule, order: Sequence[tuple[str, str]] = ()
) -> str | None:
    """The configuration the rule picks by its means over seeds, or None when no mean meets
    the rule's conditions.

    Configurations whose every confirmation run finished compete first; only when none did
    do the others.

    Args:
        stats: trial id -> its runs over seeds.
        rule: the selection rule (:func:`search.select.search_rule`).
        order: (metric, mode) pairs that break ties (the search's objectives).
    """
    pool = {t: s for t, s in stats.items() if not s.failed} or dict(stats)
    names = list(dict.fromkeys([*rule.metrics, *(m for m, _ in order)]))
    means = {
        t: {m: v for m in names if (v := s.mean(m)) is not None} for t, s in pool.items()
    }
    return choose(means, rule, order)


def ranked_trials(stats: Mapping[str, ConfirmStats], winner: str | None) -> list[str]:
    """The confirmed trials in the summary's order: the winner, then the others by mean
    (those with a failed run last)."""

    def key(t: str) -> tuple[bool, bool, float, str]:
        s = stats[t]
        mean, sign = s.mean(), 1.0 if s.mode == "min" else -1.0
        return (t != winner, bool(s.failed), sign * mean if mean is not None else math.inf, t)

    return sorted(stats, key=key)


def confirm_table(stats: Mapping[str, ConfirmStats], winner: str | None) -> str:
    """Every confirmed configuration as a markdown table, the winner first (marked ``*``)."""
    first = next(iter(stats.values()), None)
    metric = first.metric if first is not None else "value"
    head = ["trial", "seeds", f"{metric} per seed", "mean", "std", "min", "max", "n", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in ranked_trials(stats, winner):
        s = stats[t]
        values = s.values()
        spread = (min(values), max(values)) if values else (None, None)
        cells = [
            f"{t}{' *' if t == winner else ''}",
            ",".join(map(str, s.seeds)),
            ", ".join(f"{v:.4f}" for v in values),
            *(f"{v:.4f}" if v is not None else "-" for v in (s.mean(), s.std(), *spread)),
            str(s.n),
            ",".join(map(str, s.failed)) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confirm_note(stats: Mapping[str, ConfirmStats], winner: str, single: str | None) -> str:
    """The summary's line about the confirmed champion (and the single best trial it beat)."""
    s = stats[winner]
    values = s.values()
    spread = f"min {min(values):.4f}, max {max(values):.4f}" if values else "no values"
    note = (
        f"confirmed over seeds: trial {winner} has the best mean {s.metric} {s.text()} "
        f"({spread}; seeds {','.join(map(str, s.seeds))})"
    )
    if single is not None and single != winner:
        note += f"; the best single trial, {single}, has {stats[single].text()}"
    failed = sum(len(x.failed) for x in stats.values())
    return note + (f"; {failed} confirmation run(s) did not run every task" if failed else "")


def log_confirmation(
    client: Any, parent: str, stats: Mapping[str, ConfirmStats], winner: str
) -> None:
    """On the parent run: ``best/<metric>_mean`` and ``_std``, the tag
    ``adaptune.confirmed_trial`` (which ``adaptune export`` follows) and :data:`CONFIRM_TABLE`."""
    from adaptune.search.tags import CONFIRMED_TAG

    s = stats[winner]
    mean, std = s.mean(), s.std()
    if mean is not None and std is not None:
        client.log_metric(parent, f"best/{s.metric}_mean", mean)
        client.log_metric(parent, f"best/{s.metric}_std", std)
    client.set_tag(parent, CONFIRMED_TAG, winner)
    client.log_text(parent, confirm_table(stats, winner), CONFIRM_TABLE)
