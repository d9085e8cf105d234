"""Searches in an MLflow store: their parent runs found by MLflow experiment or by search name
(the latest FINISHED one), a run by id, and the experiment a search ran, read back from the YAML
logged on its parent run. ``adaptune export`` and a warm start (:mod:`search.warm`) read the
store through these.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from adaptune.search.experiment import Experiment, parse_experiment
from adaptune.search.stores import check_tracking_server, existing_store
from adaptune.search.tags import KIND_SEARCH, KIND_TAG, OPTUNA_STUDY_TAG, PARENT_TAG
from adaptune.trainables.errors import ConfigError

EXPERIMENT_ARTIFACT = "experiment.yaml"  # the resolved experiment, logged on the parent run


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    check_tracking_server(tracking_uri)  # one line now, not minutes of MLflow's retries
    return MlflowClient(tracking_uri=existing_store(tracking_uri))


def _all_runs(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _search_runs(client: Any, experiment_ids: list[str], extra: str = "") -> list[Any]:
    """The parent runs of searches in ``experiment_ids`` (``extra``: more filter clauses)."""
    where = f"tags.`{KIND_TAG}` = '{KIND_SEARCH}'{extra}"
    return [r for r in _all_runs(client, experiment_ids, where) if PARENT_TAG not in r.data.tags]


def _latest_finished(parents: list[Any], what: str) -> Any:
    finished = [r for r in parents if r.info.status == "FINISHED"]
    if not finished:
        seen = ", ".join(sorted({r.info.status for r in parents})) or "none"
        raise ConfigError(
            f"{what} holds no FINISHED search (search runs found: {len(parents)}, statuses: "
            f"{seen}); pass --run-id to export from an unfinished one"
        )
    return max(finished, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_search(client: Any, experiment_name: str) -> Any:
    """The latest FINISHED parent run of the MLflow experiment ``experiment_name``.

    Raises:
        ConfigError: no such experiment, or no finished search in it.
    """
    found = client.get_experiment_by_name(experiment_name)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        valid = f"; experiments in this store: {', '.join(names)}" if names else ""
        raise ConfigError(f"no MLflow experiment named {experiment_name!r}{valid}")
    parents = _search_runs(client, [found.experiment_id])
    return _latest_finished(parents, f"MLflow experiment {experiment_name!r}")


def find_named_search(client: Any, name: str) -> Any:
    """The latest FINISHED search named ``name`` (``--name``, else the experiment's ``name``)
    in any MLflow experiment of the store, else the latest of the MLflow experiment ``name``.

    Raises:
        ConfigError: neither a search nor an MLflow experiment of that name, or nothing
            FINISHED under it.
    """
    ids = [e.experiment_id for e in client.search_experiments()]
    named = _search_runs(client, ids, f" and tags.`{OPTUNA_STUDY_TAG}` = '{name}'") if ids else []
    if named:
        return _latest_finished(named, f"the search {name!r}")
    if client.get_experiment_by_name(name) is not None:
        return find_search(client, name)
    searches = sorted({_search_name(r) for r in _search_runs(client, ids)} if ids else set())
    valid = f"; searches in this store: {', '.join(searches)}" if searches else ""
    raise ConfigError(f"no MLflow experiment named {name!r} and no search of that name{valid}")


def _search_name(parent: Any) -> str:
    tags = parent.data.tags
    return str(tags.get(OPTUNA_STUDY_TAG) or (parent.info.run_name or "?").removeprefix("search-"))


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--run-id: no MLflow run {run_id!r} in this store") from None


def read_experiment(client: Any, parent: Any) -> Experiment:
    """The experiment the search ran, from the YAML artifact on its parent run."""
    run_id = parent.info.run_id
    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # one small file: no progress bar on stderr
    ours = bar not in os.environ  # a value the user set stays
    os.environ.setdefault(bar, "false")
    with tempfile.TemporaryDirectory(prefix="adaptune-export-") as tmp:
        try:
            local = client.download_artifacts(run_id, EXPERIMENT_ARTIFACT, tmp)
            text = Path(local).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - MlflowException or OSError: the artifact is missing
            raise ConfigError(
                f"run {run_id}: no {EXPERIMENT_ARTIFACT} artifact; is it an adaptune search run?"
            ) from None
        finally:
            if ours:
                os.environ.pop(bar, None)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"run {run_id}: {EXPERIMENT_ARTIFACT} does not hold a mapping")
    return parse_experiment(data, source=f"run {run_id}: {EXPERIMENT_ARTIFACT}")
