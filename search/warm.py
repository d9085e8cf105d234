"""Warm start: a new search's Optuna study begins with an earlier search's finished trials.

``search.warm_start`` names an earlier search of the same MLflow store, by its name (its
latest FINISHED parent run of that name, else its latest) or by its MLflow parent run id. The
parent run's tags say where its Optuna study lives. Its COMPLETE trials whose configuration
the new search could have proposed are given to the new study as they ran
(``study.add_trials``: the new space's distributions, the earlier objective value, user
attributes naming the earlier search and trial) before TPE's first suggestion; with
``search.warm_start_enqueue: k`` the best k of them by the earlier objective are also enqueued,
so the first k trials run them again on this search's stream.

A trial is carried over when, for every hyperparameter it searched or this search searches, the
value it ran with is one this search could run: inside the distribution of a searched one
(then converted to it: ``32.0`` for an ``int`` is 32), equal to the fixed value of one this
search does not search. A hyperparameter this search searches that the earlier one did not
takes the earlier experiment's fixed value. PRUNED trials are not given: their value is a
low-fidelity score at an earlier task, on another stream.

The earlier values were measured on the earlier stream; that is the point (a model adapted
yesterday, a new domain today: re-tune on the extended stream with yesterday's knowledge) and
the caveat (docs/warm-start.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adaptune.search.experiment import Experiment
from adaptune.search.locations import optuna_storage_url
from adaptune.search.search_runs import _search_name, _search_runs, read_experiment
from adaptune.search.stores import check_tracking_server, resolve_tracking_uri, sqlite_file
from adaptune.search.tags import (
    KIND_SEARCH,
    KIND_TAG,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_TAG,
    PARENT_TAG,
    WARM_ENQUEUED_ATTR,
    WARM_RUN_ATTR,
    WARM_SEARCH_ATTR,
    WARM_START_RUN_TAG,
    WARM_TRIAL_ATTR,
)
from adaptune.spaces import Dist
from adaptune.spaces.paths import get_hp
from adaptune.trainables.config import HYPERPARAMETERS
from adaptune.trainables.errors import ConfigError

FIELD = "search.warm_start"
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a search's name (the experiment schema's rule)
_NO_STUDY = ("pbt", "pb2")  # algorithms without an Optuna study


@dataclass(frozen=True)
class WarmStart:
    """What an earlier search gives a new one (:func:`load_warm_start`)."""

    source: str  # the earlier search's name
    parent_run_id: str  # its MLflow parent run
    complete: int  # its COMPLETE trials
    trials: list[Any]  # optuna FrozenTrials in this search's space, to add as they ran
    # (earlier trial number, parameters in this search's space), best first, to run again
    enqueue: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    outside: int = 0  # COMPLETE trials outside this search's space
    first_outside: str = ""  # why the first of them was left out

    @property
    def given(self) -> int:
        return len(self.trials)


def warm_start_problems(exp: Experiment) -> list[str]:
    """The warm-start settings' problems that need no store, one line each."""
    s = exp.search
    if s.warm_start is None:
        if not s.warm_start_enqueue:
            return []
        return [
            f"search.warm_start_enqueue: needs {FIELD}, the earlier search whose best "
            f"configurations run first (got warm_start_enqueue={s.warm_start_enqueue} and no "
            "warm_start)"
        ]
    problems = []
    if s.algorithm in _NO_STUDY:
        problems.append(
            f"{FIELD}: seeds an Optuna study; valid with search.algorithm tpe or random "
            f"(got {s.algorithm!r}, which has none)"
        )
    if s.warm_start_enqueue > s.num_samples:
        problems.append(
            f"search.warm_start_enqueue: must be <= search.num_samples ({s.num_samples}), the "
            f"trials that run them (got {s.warm_start_enqueue})"
        )
    return problems


def load_warm_start(exp: Experiment) -> WarmStart | None:
    """Resolve ``exp.search.warm_start`` and read what it gives; None without one.

    Reads the MLflow store and the earlier study only: nothing is written.

    Raises:
        ConfigError: one line: no search of that name (listing those in the store) or no run
            of that id, an earlier search whose study cannot be opened or whose objective
            differs, or no COMPLETE trial of it inside this search's space (how many were
            outside, and why the first was).
    """
    ref = exp.search.warm_start
    if ref is None:
        return None
    client = _client(exp.tracking.tracking_uri, ref)
    parent = find_earlier_search(client, ref)
    name = search_name(parent)
    earlier = _earlier_experiment(client, parent, name)
    _check_comparable(exp, earlier, name)
    tags = parent.data.tags
    if (tags.get(OPTUNA_STORAGE_TAG), tags.get(OPTUNA_STUDY_TAG)) == (
        optuna_storage_url(exp),
        exp.name,
    ):
        raise ConfigError(
            f"{FIELD}: {ref!r} is this search itself; name an earlier search (or give this "
            "one a new --name)"
        )
    study = open_earlier_study(parent, name)
    return select_trials(exp, earlier, study, source=name, parent_run_id=parent.info.run_id)


def _client(tracking_uri: str, ref: str) -> Any:
    from mlflow.tracking import MlflowClient

    check_tracking_server(tracking_uri)
    resolved = resolve_tracking_uri(tracking_uri, create=False)
    db = sqlite_file(resolved)
    if db is not None and not db.is_file():  # MlflowClient would create an empty store there
        raise ConfigError(
            f"{FIELD}: no search {ref!r}: the MLflow store {db} does not exist yet "
            "(valid values: the name or parent run id of a search recorded there)"
        )
    return MlflowClient(tracking_uri=resolved)


def find_earlier_search(client: Any, ref: str) -> Any:
    """The parent run ``ref`` names: a parent run id, else the latest FINISHED search of that
    name (the latest of any status when none finished).

    Raises:
        ConfigError: no such search, listing the searches in the store.
    """
    from mlflow.exceptions import MlflowException

    if _RUN_ID.fullmatch(ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            run = None
        if run is not None:
            if run.data.tags.get(KIND_TAG) != KIND_SEARCH or PARENT_TAG in run.data.tags:
                kind = run.data.tags.get(KIND_TAG, "not adaptune's")
                raise ConfigError(
                    f"{FIELD}: the MLflow run {ref} is not a search's parent run (it is a "
                    f"{kind} run); give the parent run id or the search's name"
                )
            return run
    ids = [e.experiment_id for e in client.search_experiments()]
    named = []
    if ids and _NAME.fullmatch(ref):
        named = _search_runs(client, ids, f" and tags.`{OPTUNA_STUDY_TAG}` = '{ref}'")
    if not named:
        searches = sorted({search_name(r) for r in _search_runs(client, ids)} if ids else set())
        valid = ", ".join(searches) if searches else "none recorded yet"
        raise ConfigError(
            f"{FIELD}: no search named {ref!r} and no search parent run of that id in "
            f"{client.tracking_uri}; searches there: {valid}"
        )
    finished = [r for r in named if r.info.status == "FINISHED"]
    return max(finished or named, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def search_name(parent: Any) -> str:
    """A search's name, from its parent run."""
    return _search_name(parent)


def _earlier_experiment(client: Any, parent: Any, name: str) -> Experiment:
    try:
        return read_experiment(client, parent)
    except ConfigError as err:
        raise ConfigError(f"{FIELD}: the search {name!r}: {err}") from None


def _check_comparable(exp: Experiment, earlier: Experiment, name: str) -> None:
    """The earlier search must have an Optuna study and this search's objective."""
    if earlier.search.algorithm in _NO_STUDY:
        raise ConfigError(
            f"{FIELD}: the search {name!r} ran {earlier.search.algorithm}, which keeps no "
            "Optuna study; name a tpe or random search"
        )
    if earlier.search.metrics != exp.search.metrics:
        raise ConfigError(
            f"{FIELD}: the search {name!r} optimised {', '.join(earlier.search.metrics)}, this "
            f"one {', '.join(exp.search.metrics)}: its values do not carry over (valid: a "
            "search with the same search.metric)"
        )


def open_earlier_study(parent: Any, name: str) -> Any:
    """The earlier search's Optuna study, opened from the storage its parent run names.

    Raises:
        ConfigError: no storage tag, a sqlite file that is gone, no such study in it.
    """
    import optuna

    tags = parent.data.tags
    url, study_name = tags.get(OPTUNA_STORAGE_TAG), tags.get(OPTUNA_STUDY_TAG)
    where = (
        f"{FIELD}: cannot open the Optuna study of the search {name!r} "
        f"(parent run {parent.info.run_id})"
    )
    if not url or not study_name:
        raise ConfigError(f"{where}: the run has no {OPTUNA_STORAGE_TAG} tag")
    db = sqlite_file(url)
    if db is not None and not db.is_file():  # RDBStorage would create an empty one
        raise ConfigError(f"{where}: {db} does not exist (moved or deleted?)")
    try:
        return optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        raise ConfigError(f"{where}: {url} holds no study {study_name!r}") from None
    except Exception as err:  # sqlalchemy's, for a file that is not a study's database
        line = (str(err).splitlines() or [""])[0]
        raise ConfigError(f"{where}: {type(err).__name__}: {line}") from None


def select_trials(
    exp: Experiment, earlier: Experiment, study: Any, *, source: str, parent_run_id: str
) -> WarmStart:
    """The earlier study's COMPLETE trials that fit ``exp``'s space, and the best k of them.

    Args:
        exp: the new search.
        earlier: the earlier search's experiment (its fixed values fill in what it did not
            search).
        study: the earlier Optuna study.
        source: the earlier search's name.
        parent_run_id: its MLflow parent run id.

    Raises:
        ConfigError: none fits (how many were outside, why the first was), or none finished.
    """
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(
            f"{FIELD}: the search {source!r} has no COMPLETE trial to give (trials: "
            f"{len(study.trials)}; a trial stopped early or failed is not carried over)"
        )
    dists = new_distributions(exp)
    fixed_before = _fixed_values(earlier)
    fixed_now = _fixed_values(exp)
    attrs = {WARM_SEARCH_ATTR: source, WARM_RUN_ATTR: parent_run_id}
    usable, reasons = [], []
    for trial in complete:
        params, why = _in_space(trial, dists, fixed_before, fixed_now)
        if params is None:
            reasons.append(f"trial {trial.number}: {why}")
            continue
        given = optuna.trial.create_trial(
            params=params,
            distributions={n: dists[n] for n in params},
            values=list(trial.values),
            user_attrs={**attrs, WARM_TRIAL_ATTR: trial.number},
        )
        usable.append((trial, given))
    if not usable:
        raise ConfigError(
            f"{FIELD}: none of the {len(complete)} COMPLETE trials of the search {source!r} "
            f"lies in this search's space (first: {reasons[0]})"
        )
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    best = sorted(usable, key=lambda pair: (sign * pair[0].values[0], pair[0].number))
    k = exp.search.warm_start_enqueue
    return WarmStart(
        source=source,
        parent_run_id=parent_run_id,
        complete=len(complete),
        trials=[given for _, given in usable],
        enqueue=[(t.number, dict(g.params)) for t, g in best[:k]],
        outside=len(reasons),
        first_outside=reasons[0] if reasons else "",
    )


def new_distributions(exp: Experiment) -> dict[str, Any]:
    """This search's Optuna distributions by hyperparameter name, as its searcher makes them."""
    from adaptune.search.searcher import ContinualOptunaSearch
    from adaptune.spaces.tune import build_param_space

    return ContinualOptunaSearch.convert_search_space(build_param_space(exp))


def _fixed_values(exp: Experiment) -> dict[str, Any]:
    """Every hyperparameter ``exp`` does not search: its value (``space``, else ``run``)."""
    run = exp.run.model_dump(mode="json")
    return {
        n: exp.space[n] if n in exp.space else get_hp(run, n)
        for n in HYPERPARAMETERS
        if not isinstance(exp.space.get(n), Dist)
    }


def _in_space(
    trial: Any, dists: dict[str, Any], fixed_before: dict[str, Any], fixed_now: dict[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """An earlier trial's parameters in the new space, or None and why it is outside."""
    for name, value in trial.params.items():
        if name not in dists and name not in fixed_now:
            return None, f"it searched {name}, which is no hyperparameter of this version"
        if name not in dists and fixed_now[name] != value:
            return None, f"{name}={value!r}, and this search fixes {name}={fixed_now[name]!r}"
    params = {}
    for name, dist in dists.items():
        value = trial.params[name] if name in trial.params else fixed_before.get(name)
        try:
            internal = dist.to_internal_repr(value)
            inside = dist._contains(internal)
        except (ValueError, TypeError):
            inside = False
        if not inside:
            return None, f"{name}={value!r} is outside {_describe(dist)}"
        params[name] = dist.to_external_repr(internal)
    return params, ""


def _describe(dist: Any) -> str:
    choices = getattr(dist, "choices", None)
    if choices is not None:
        return f"choice {list(choices)}"
    log = "log-" if getattr(dist, "log", False) else ""
    return f"{log}[{dist.low:g}, {dist.high:g}]"


def give_warm_start(study: Any, warm: WarmStart) -> tuple[int, int]:
    """Add ``warm``'s trials to ``study`` and enqueue its best k, unless the study holds them
    already (a resumed search reopens its study: nothing is given twice).

    Returns:
        The trials added and enqueued by this call.
    """
    given, enqueued = set(), set()
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(WARM_RUN_ATTR) == warm.parent_run_id:
            given.add(t.user_attrs.get(WARM_TRIAL_ATTR))
            enqueued.add(t.user_attrs.get(WARM_ENQUEUED_ATTR))
    new = [t for t in warm.trials if t.user_attrs[WARM_TRIAL_ATTR] not in given]
    study.add_trials(new)
    attrs = {WARM_SEARCH_ATTR: warm.source, WARM_RUN_ATTR: warm.parent_run_id}
    again = [(n, p) for n, p in warm.enqueue if n not in enqueued]
    for number, params in again:
        study.enqueue_trial(params, user_attrs={**attrs, WARM_ENQUEUED_ATTR: number})
    return len(new), len(again)


def describe_warm_start(warm: WarmStart | None) -> str | None:
    """One line for ``adaptune search --dry-run`` and the search's start; None without one."""
    if warm is None:
        return None
    outside = (
        f"; {warm.outside} outside this space (first: {warm.first_outside})"
        if warm.outside
        else ""
    )
    return (
        f"warm start: {warm.given} of {warm.complete} COMPLETE trials of the search "
        f"{warm.source!r} (parent run {warm.parent_run_id}) given to the study, best "
        f"{len(warm.enqueue)} enqueued to run first{outside}"
    )


def warm_start_metrics(warm: WarmStart) -> dict[str, float]:
    """What the parent run records of a warm start (as metrics)."""
    return {
        "warm_start/given": float(warm.given),
        "warm_start/enqueued": float(len(warm.enqueue)),
        "warm_start/outside": float(warm.outside),
    }


def record_warm_start(client: Any, parent_run_id: str, warm: WarmStart) -> None:
    """On the search's parent run: the earlier search's parent run id (tag) and how many
    trials it gave and enqueued (metrics; the param ``search.warm_start`` names it)."""
    from mlflow.entities import Metric, RunTag

    client.log_batch(
        parent_run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in warm_start_metrics(warm).items()],
        tags=[RunTag(WARM_START_RUN_TAG, warm.parent_run_id)],
        synchronous=True,
    )


def given_trial(trial: Any) -> bool:
    """Whether a study trial was given by an earlier search (it never ran in this one)."""
    return WARM_TRIAL_ATTR in trial.user_attrs
