"""The champion-selection rule: which trial that ran every task a search registers.

A rule reads ``min|max METRIC [where METRIC OP NUMBER [and METRIC OP NUMBER ...]]`` with OP one
of ``<=``, ``<``, ``>=``, ``>``; for example ``min new_task_loss where forgetting <= 0.1``.
Among the trials that ran every task, those whose final metrics meet every condition compete;
the best on the rule's metric wins, ties broken by the search's objectives in order (each in its
mode), then by trial id, so a search and ``adaptune export --select`` agree on one trial.

Without ``search.select`` the rule is the search's first objective in its mode
(``min new_task_loss`` for ``metric: [new_task_loss, forgetting]``): with the ties broken by
the other objectives, that trial is on the Pareto front.

A rule is parsed by a small tokenizer, never evaluated as code.

Example:
    >>> rule = parse_rule("min new_task_loss where forgetting <= 0.1")
    >>> choose({"a": {"new_task_loss": 2.0, "forgetting": 0.3},
    ...         "b": {"new_task_loss": 2.2, "forgetting": 0.05}}, rule)
    'b'
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adaptune.trainables.errors import ConfigError

GRAMMAR = (
    "min|max METRIC [where METRIC OP NUMBER [and METRIC OP NUMBER ...]], OP one of <= < >= >"
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
# One token at a time: an operator, a number (before a name: `1e-3` is a number), a name.
# Names hold `/` for per-task metrics (`loss/code`, `retain/wiki`).
_TOKEN = re.compile(
    r"\s*(?:(?P<op><=|>=|<|>)"
    r"|(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?![\w./-])"
    r"|(?P<name>[A-Za-z_][\w./-]*))"
)


@dataclass(frozen=True)
class Condition:
    """``metric op bound``: a constraint a trial's final value must meet."""

    metric: str
    op: str
    bound: float

    def holds(self, value: float | None) -> bool:
        return value is not None and math.isfinite(value) and _OPS[self.op](value, self.bound)

    def __str__(self) -> str:
        short = f"{self.bound:g}"  # `0`, `0.1`, `1e-05`; repr only where %g would round
        bound = short if float(short) == self.bound else repr(self.bound)
        return f"{self.metric} {self.op} {bound}"


@dataclass(frozen=True)
class Rule:
    """A parsed selection rule (:func:`parse_rule`)."""

    mode: str  # "min" or "max"
    metric: str
    where: tuple[Condition, ...] = ()

    @property
    def metrics(self) -> list[str]:
        """Every metric the rule reads, the ranked one first, each once."""
        return list(dict.fromkeys([self.metric, *(c.metric for c in self.where)]))

    def __str__(self) -> str:
        text = f"{self.mode} {self.metric}"
        return text + (" where " + " and ".join(map(str, self.where)) if self.where else "")


def _tokens(text: str) -> list[tuple[str, str]]:
    """``text`` as (kind, token) pairs; kind is ``op``, ``num`` or ``name``."""
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"unexpected {text[pos:].strip()[:20]!r}")
        kind = m.lastgroup or "name"
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _expect(tokens: list[tuple[str, str]], i: int, kind: str, what: str) -> str:
    if i >= len(tokens):
        raise ValueError(f"expected {what}, got nothing")
    got_kind, token = tokens[i]
    if got_kind != kind:
        raise ValueError(f"expected {what}, got {token!r}")
    return token


def parse_rule(text: str) -> Rule:
    """Parse a selection rule (grammar in the module docstring; keywords in any case).

    Raises:
        ValueError: one line: what was expected where, and the grammar.
    """
    try:
        tokens = _tokens(text)
        mode = _expect(tokens, 0, "name", "'min' or 'max'").lower()
        if mode not in ("min", "max"):
            raise ValueError(f"expected 'min' or 'max', got {tokens[0][1]!r}")
        metric = _expect(tokens, 1, "name", "a metric")
        where: list[Condition] = []
        i = 2
        while i < len(tokens):
            keyword = "where" if not where else "and"
            if tokens[i][1].lower() != keyword:
                raise ValueError(f"expected {keyword!r}, got {tokens[i][1]!r}")
            name = _expect(tokens, i + 1, "name", "a metric")
            op = _expect(tokens, i + 2, "op", "one of <= < >= >")
            bound = float(_expect(tokens, i + 3, "num", "a number"))
            where.append(Condition(name, op, bound))
            i += 4
    except ValueError as err:
        raise ValueError(f"cannot parse {text!r} ({err}); a rule reads: {GRAMMAR}") from None
    return Rule(mode, metric, tuple(where))


def check_rule(rule: Rule, allowed: Mapping[str, str]) -> None:
    """Every metric of ``rule`` must be one the trainable reports; its mode the ranked metric's
    better direction.

    Args:
        rule: the parsed rule.
        allowed: the metrics the trainable reports -> their better direction.

    Raises:
        ValueError: one line naming the metric and the valid ones, or the mode that fits.
    """
    for name in rule.metrics:
        if name not in allowed:
            raise ValueError(
                f"{name!r} is not a metric the trainable reports; valid values: "
                f"{', '.join(allowed)}"
            )
    better = allowed[rule.metric]
    if rule.mode != better:
        raise ValueError(
            f"{rule.metric} is better when {'lower' if better == 'min' else 'higher'}, so the "
            f"rule must start with {better!r} (got {str(rule)!r})"
        )


def checked_rule(text: str, field: str, allowed: Mapping[str, str] | None = None) -> Rule:
    """:func:`parse_rule`, then :func:`check_rule` against ``allowed`` when given.

    Raises:
        ConfigError: ``<field>: <what is wrong>``, one line.
    """
    try:
        rule = parse_rule(text)
        if allowed is not None:
            check_rule(rule, allowed)
    except ValueError as err:
        raise ConfigError(f"{field}: {err}") from None
    return rule


def search_rule(search: Any) -> Rule:
    """The rule a search's champion is chosen by: ``search.select``, else its first objective
    in its mode.

    Args:
        search: a :class:`search.experiment.SearchConfig` (``select`` already checked).
    """
    if search.select:
        return parse_rule(search.select)
    return Rule(search.modes[0], search.metrics[0])


def objective_text(search: Any) -> str:
    """The objectives as one line: ``stream_loss (min)``; ``new_task_loss (min), forgetting
    (min)`` for a multi-objective search."""
    return ", ".join(f"{m} ({d})" for m, d in zip(search.metrics, search.modes, strict=False))


def champion_row(search: Any, rows: Sequence[Any], notes: list[str]) -> Any:
    """The row :func:`search_rule` picks among the rows that ran every task, or None; when
    some ran every task but none meets the rule, a note says why.

    Args:
        search: the :class:`search.experiment.SearchConfig`.
        rows: :class:`search.summary.TrialRow` objects (``metrics``: final values).
        notes: the summary's notes, appended to.
    """
    rule = search_rule(search)
    done: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.status == "complete":
            values = dict(r.metrics)
            if r.value is not None:
                values.setdefault(search.primary_metric, r.value)
            done[r.trial_id] = values
    winner = choose(done, rule, list(zip(search.metrics, search.modes, strict=False)))
    if winner is None and done:
        notes.append(
            f"nothing registered: {explain_no_match(done, rule)}; `adaptune export NAME "
            "--select RULE` picks a trial by another rule"
        )
    return next((r for r in rows if r.trial_id == winner), None)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def choose(
    trials: Mapping[str, Mapping[str, float]],
    rule: Rule,
    order: Sequence[tuple[str, str]] = (),
) -> str | None:
    """The trial the rule picks, or None when no trial meets it.

    Args:
        trials: trial id -> its final metrics (trials that ran every task only).
        rule: the selection rule.
        order: (metric, mode) pairs that break ties on the rule's metric, in order (the
            search's objectives); a missing value ranks last.

    Returns:
        The winning trial id; a tie on every value goes to the smallest trial id.
    """
    eligible = [
        t
        for t, values in trials.items()
        if _finite(values.get(rule.metric))
        and all(c.holds(values.get(c.metric)) for c in rule.where)
    ]
    if not eligible:
        return None
    keys = [(rule.metric, rule.mode), *((m, d) for m, d in order if m != rule.metric)]

    def rank(trial_id: str) -> tuple[Any, ...]:
        values = trials[trial_id]
        ranked = []
        for metric, mode in keys:
            v = values.get(metric)
            ranked.append((v if mode == "min" else -v) if _finite(v) else math.inf)
        return (*ranked, trial_id)

    return min(eligible, key=rank)


def pick_trial(
    trials: Mapping[str, Mapping[str, float]], search: Any, rule: Rule, field: str
) -> str:
    """:func:`choose` with the search's objectives breaking ties.

    Raises:
        ConfigError: ``<field>: <why no trial meets the rule>``.
    """
    best = choose(trials, rule, list(zip(search.metrics, search.modes, strict=False)))
    if best is None:
        raise ConfigError(f"{field}: {explain_no_match(trials, rule)}")
    return best


def explain_no_match(trials: Mapping[str, Mapping[str, float]], rule: Rule) -> str:
    """Why no trial meets ``rule``: how many ran every task, and the range of each condition's
    metric among them (what a looser rule could ask for)."""
    if not trials:
        return f"no trial ran every task, so none meets {str(rule)!r}"
    ranges = []
    for metric in dict.fromkeys(c.metric for c in rule.where):
        values = [v[metric] for v in trials.values() if _finite(v.get(metric))]
        if values:
            ranges.append(f"{metric} from {min(values):.4g} to {max(values):.4g}")
        else:
            ranges.append(f"{metric} not reported")
    seen = f" ({'; '.join(ranges)})" if ranges else ""
    return f"none of the {len(trials)} trial(s) that ran every task meets {str(rule)!r}{seen}"
