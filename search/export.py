"""``adaptune export``: the winner of a search as a runnable experiment with fixed values.

The search is found in MLflow (:mod:`search.search_runs`) by its name (``--name``, else the
experiment's: its latest FINISHED parent run of that name), by MLflow experiment name (its latest
FINISHED search), or by run id (a parent run, or one trial's child run to export that trial). The
winner is the parent's champion (tag ``adaptune.champion_trial_id``), else its best FINISHED trial
by the search's objective. Its searched values are written into ``run`` of the experiment YAML
logged on the parent run, ``space`` is emptied, and ``run.hardware`` is pinned to the CPU threads
(and CPU device) the trial ran with, so ``adaptune train best.yaml`` reproduces the trial's losses
on the same machine. A PBT/PB2 trial's values come from its ``lineage.json`` instead (its params
are the values it started with), the mutated ones per task as ``run.schedule`` (:mod:`search.pbt`).

Example:
    >>> path, winner = export_best("quickstart", out="best.yaml")  # doctest: +SKIP
    >>> winner.params  # doctest: +SKIP
    {'lr': 0.0011, 'buffer_size': 256, ...}
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from adaptune.search.experiment import Experiment, experiment_yaml, parse_experiment
from adaptune.search.pbt import Lineage, apply_lineage, is_population, read_lineage
from adaptune.search.search_runs import (
    _all_runs,
    _client,
    _get_run,
    find_named_search,
    read_experiment,
)
from adaptune.search.select import Rule, checked_rule, pick_trial, search_rule
from adaptune.search.stores import DEFAULT_TRACKING_URI
from adaptune.search.tags import (
    CHAMPION_TAG,
    CONFIRM_TAG,
    CONFIRMED_TAG,
    CUDA_TAG,
    KIND_SEARCH,
    KIND_TAG,
    PARENT_TAG,
    TASKS_DONE_TAG,
    THREADS_TAG,
    TRIAL_TAG,
)
from adaptune.spaces import Dist
from adaptune.spaces.paths import get_hp, set_hp
from adaptune.trainables.errors import ConfigError

_RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids


@dataclass(frozen=True)
class Winner:
    parent_run_id: str
    run_id: str  # the trial's child run
    trial_id: str
    how: str  # "champion", "best finished trial" or "requested trial"
    metric: str
    mode: str
    value: float | None  # the objective at the trial's last task
    tasks_done: int
    params: dict[str, Any]  # the space's names -> typed values
    threads: int  # torch CPU threads the trial ran with
    device: str  # the run.hardware.device written to best.yaml


def _objective(run: Any, metric: str) -> float | None:
    value = run.data.metrics.get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def pick_winner(
    client: Any, parent: Any, exp: Experiment, select: Rule | None = None
) -> tuple[Any, str]:
    """The FINISHED trial ``select`` picks (by final metrics); without it the confirmed trial
    (``search.confirm``: the best mean over seeds) or the champion's run, else the one the
    search's rule picks (``search.select`` or its first objective). Confirmation runs (a
    trial's values with another seed) are never picked: they are not the search's trials.

    Raises:
        ConfigError: no finished trial with a finite objective, or none meets the rule.
    """
    parent_id = parent.info.run_id
    children = _all_runs(
        client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"
    )
    children = [r for r in children if r.data.tags.get(CONFIRM_TAG) != "true"]
    metric = exp.search.primary_metric
    finished = [
        r
        for r in children
        if r.info.status == "FINISHED" and _objective(r, metric) is not None
    ]
    confirmed = parent.data.tags.get(CONFIRMED_TAG)  # search.confirm's pick
    champion = confirmed or parent.data.tags.get(CHAMPION_TAG)
    for run in finished:
        if select is None and champion is not None and run.data.tags.get(TRIAL_TAG) == champion:
            return run, "champion, best mean over seeds" if confirmed else "champion"
    if not finished:
        raise ConfigError(
            f"search run {parent_id} has no FINISHED trial with a {metric} value "
            f"({len(children)} trial(s), none ran every task)"
        )
    rule, field = (select, "--select") if select else (search_rule(exp.search), "search.select")
    runs = {str(r.data.tags.get(TRIAL_TAG, r.info.run_id)): r for r in finished}
    best = pick_trial({t: dict(r.data.metrics) for t, r in runs.items()}, exp.search, rule, field)
    selected = select is not None or exp.search.select
    how = f"selected by {str(rule)!r}" if selected else "best finished trial"
    if select is None and champion is not None:  # tagged, but its run is not a finished one
        how += f"; champion {champion} has no finished run"
    return runs[best], how


def resolve(
    client: Any, *, experiment_name: str | None = None, run_id: str | None = None,
    select: Rule | None = None,
) -> tuple[Any, Any, Experiment, str]:
    """(parent run, winning child run, the search's experiment, how the winner was chosen).

    ``experiment_name`` may be a search's name, an MLflow experiment's or a run id;
    ``select`` a rule that picks the winner instead of the champion (:func:`pick_winner`).
    """
    if run_id is None and experiment_name is not None and _RUN_ID.fullmatch(experiment_name):
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            run_id = client.get_run(experiment_name).info.run_id
    if run_id is not None:
        run = _get_run(client, run_id)
        parent_id = run.data.tags.get(PARENT_TAG)
        if parent_id is None:
            parent = run
        else:
            if select is not None:
                raise ConfigError("--select picks among a search's trials: give the search")
            parent = _get_run(client, parent_id)
            exp = read_experiment(client, parent)
            if run.info.status != "FINISHED":
                done = run.data.tags.get(TASKS_DONE_TAG, "?")
                raise ConfigError(
                    f"--run-id: trial {run.data.tags.get(TRIAL_TAG, run_id)} did not finish "
                    f"(status {run.info.status}, {done} of {len(exp.run.stream.tasks)} tasks); "
                    "export a FINISHED trial"
                )
            return parent, run, exp, "requested trial"
    else:
        assert experiment_name is not None
        parent = find_named_search(client, experiment_name)
    if parent.data.tags.get(KIND_TAG) != KIND_SEARCH:
        raise ConfigError(f"run {parent.info.run_id} is not an adaptune search run")
    exp = read_experiment(client, parent)
    if select is not None:
        from adaptune.search.checks import selectable_metrics

        checked_rule(str(select), "--select", selectable_metrics(exp))
    child, how = pick_winner(client, parent, exp, select)
    return parent, child, exp, how


def fixed_experiment(
    exp: Experiment, child: Any, *, name: str | None = None, lineage: Lineage | None = None
) -> tuple[Experiment, dict[str, Any], int, str]:
    """``exp`` with the trial's values in ``run``, no ``space``, and its hardware pinned.

    MLflow keeps params as strings; each is converted back by validating it through the run
    schema (``"16"`` -> ``16`` for ``buffer_size``, ``"1e-05"`` -> ``1e-05`` for ``lr``).
    A PBT/PB2 trial's params are its first config, which copying a donor replaced: its
    ``lineage`` (:func:`search.pbt.read_lineage`) gives its final values instead, and the
    value each task trained with of every mutated name as ``run.schedule``.

    Returns:
        (the fixed experiment, the trial's values by name, its threads, the device written)
    """
    data = exp.model_dump(mode="json", exclude_none=True)
    params = child.data.params if lineage is None else lineage.values
    trial = child.data.tags.get(TRIAL_TAG, child.info.run_id)
    for key, spec in exp.space.items():
        if key in params:
            value: Any = params[key]  # a string; the schema below gives it its type
        elif isinstance(spec, Dist):
            raise ConfigError(f"trial {trial}: no MLflow param {key!r}, a searched value")
        else:
            value = spec
        set_hp(data["run"], key, value)

    # tags since settings stopped being logged as metrics; an older search has the metrics
    settings = {**child.data.metrics, **child.data.tags}
    hardware = data["run"].setdefault("hardware", {})
    threads = settings.get(THREADS_TAG, settings.get("threads"))
    if threads is None:  # a run that did not log it: the threads the trial was given
        threads = exp.run.hardware.threads or max(1, int(exp.resources.cpus_per_trial))
    hardware["threads"] = int(threads)
    cuda = settings.get(CUDA_TAG, settings.get("cuda"))
    cuda = None if cuda is None else int(cuda)
    if cuda is not None and not cuda and hardware.get("device", "auto") == "auto":
        # on a machine with a GPU, `auto` in `adaptune train` would pick CUDA
        hardware["device"] = "cpu"
    data["space"] = {}
    data["name"] = name or f"{exp.name}-best"
    apply_lineage(data["run"], lineage)
    fixed = parse_experiment(data, source=f"trial {trial}")
    run = fixed.run.model_dump(mode="json")
    values = {key: get_hp(run, key) for key in exp.space}
    values |= {k: v for k, v in (fixed.run.schedule or {}).items() if k in values}
    return fixed, values, int(threads), fixed.run.hardware.device


def render(fixed: Experiment, winner: Winner, tracking_uri: str) -> str:
    """``best.yaml``: a comment naming the source, then the experiment, defaults included."""
    value = "-" if winner.value is None else f"{winner.value!r}"
    head = [
        f"# adaptune export: trial {winner.trial_id} of a search ({winner.how}), values fixed.",
        f"# MLflow {tracking_uri}",
        f"#   parent run {winner.parent_run_id}, trial run {winner.run_id}",
        f"# {winner.metric} ({winner.mode}) = {value} after {winner.tasks_done} task(s)",
        f"# run.hardware pins threads={winner.threads} and device={winner.device} as in the trial;",
        "# `adaptune train` with this file reproduces its losses on the same machine.",
    ]
    if fixed.run.schedule:  # PBT: the values of the trials that trained each task
        head.append("# run.schedule: the value of each task, as it trained in the search.")
    text = "\n".join(head) + "\n" + experiment_yaml(fixed)
    again = parse_experiment(yaml.safe_load(text), source="best.yaml")  # it must load back
    if again != fixed:
        raise RuntimeError("the exported experiment does not survive a YAML round trip")
    return text


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_best(
    experiment_name: str | None = None,
    *,
    run_id: str | None = None,
    out: str | Path = "best.yaml",
    tracking_uri: str = DEFAULT_TRACKING_URI,
    name: str | None = None,
    overwrite: bool = False,
    select: str | None = None,
) -> tuple[Path, Winner]:
    """Write the winner of a search as a runnable experiment.

    Args:
        experiment_name: a search's name, an MLflow experiment (its latest FINISHED search)
            or a parent run id.
        run_id: instead, a search's parent run id, or a trial's child run id.
        out: the file to write.
        tracking_uri: the MLflow store (a relative ``sqlite:///`` path is taken from the cwd).
        name: the exported experiment's name (default ``<name>-best``).
        overwrite: replace ``out`` when it exists.
        select: a selection rule (``"min new_task_loss where forgetting <= 0.1"``) that picks
            the winner among the search's FINISHED trials instead of its champion.

    Returns:
        (the path written, the winner)

    Raises:
        ConfigError: no such experiment or run, no finished trial, ``out`` exists, or a bad
            ``select`` (does not parse, names a metric not reported, no trial meets it).
    """
    if (experiment_name is None) == (run_id is None):
        raise ConfigError("give an experiment name or --run-id (exactly one)")
    rule = checked_rule(select, "--select") if select is not None else None
    path = Path(out)
    if path.exists() and not overwrite:
        raise ConfigError(f"-o: {path} already exists; pass --force to replace it")
    client = _client(tracking_uri)
    parent, child, exp, how = resolve(
        client, experiment_name=experiment_name, run_id=run_id, select=rule
    )
    lineage = read_lineage(client, child, exp) if is_population(exp) else None
    fixed, values, threads, device = fixed_experiment(exp, child, name=name, lineage=lineage)
    shown = rule or search_rule(exp.search)  # the value shown: the rule's metric
    winner = Winner(
        parent_run_id=parent.info.run_id,
        run_id=child.info.run_id,
        trial_id=child.data.tags.get(TRIAL_TAG, child.info.run_id),
        how=how,
        metric=shown.metric,
        mode=shown.mode,
        value=_objective(child, shown.metric),
        tasks_done=int(child.data.tags.get(TASKS_DONE_TAG, 0) or 0),
        params=values,
        threads=threads,
        device=device,
    )
    write_atomic(path, render(fixed, winner, client.tracking_uri))
    return path, winner


def cmd_export(args: argparse.Namespace) -> int:
    experiment_name, tracking_uri = args.experiment, args.tracking_uri
    if experiment_name and experiment_name.endswith((".yaml", ".yml")) and Path(
        experiment_name
    ).is_file():  # an experiment file: its MLflow experiment and store
        from adaptune.search.experiment import load_experiment

        exp = load_experiment(experiment_name)
        experiment_name = exp.tracking.experiment_name or exp.name
        tracking_uri = tracking_uri or exp.tracking.tracking_uri
    path, winner = export_best(
        experiment_name,
        run_id=args.run_id,
        out=args.out,
        tracking_uri=tracking_uri or DEFAULT_TRACKING_URI,
        name=args.name,
        overwrite=args.force,
        select=args.select,
    )
    value = "-" if winner.value is None else f"{winner.value:.6g}"
    print(
        f"wrote {path}: trial {winner.trial_id} ({winner.how}) of search run "
        f"{winner.parent_run_id}, {winner.metric} {value}"
    )
    for key, v in {**winner.params, "threads": winner.threads, "device": winner.device}.items():
        print(f"  {key}: {v!r}" if isinstance(v, str) else f"  {key}: {v}")
    print(f"rerun it: adaptune train {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    export = sub.add_parser(
        "export", help="write a search's winner as an experiment with fixed values"
    )
    export.add_argument(
        "experiment", nargs="?",
        help="a search's name (its latest finished run), an MLflow experiment name (its "
             "latest finished search), a parent run id, or the experiment YAML",
    )
    export.add_argument("--run-id", help="a search's parent run id, or one trial's run id")
    export.add_argument("-o", "--out", default="best.yaml", help="file to write (best.yaml)")
    export.add_argument(
        "--tracking-uri", default=None,
        help=f"MLflow store (default: the YAML's, else {DEFAULT_TRACKING_URI})",
    )
    export.add_argument("--name", help="the exported experiment's name (default <name>-best)")
    export.add_argument("--force", action="store_true", help="replace an existing output file")
    export.add_argument(
        "--select", metavar="RULE",
        help="pick the winner among the finished trials by a rule, not the champion: "
             "'min new_task_loss where forgetting <= 0.1' (docs/multi-objective.md)",
    )
    export.set_defaults(func=cmd_export)
