"""``adaptune ui``: serve the MLflow UI for the tracking store, on 127.0.0.1 by default.

It starts ``mlflow server`` on the store and prints (``--open``: also opens) one URL: the
"Model training" runs table of the search's MLflow experiment, every trial sorted by the
objective, with the objective's column shown. How that URL gets there, found by driving MLflow
3.17's UI in headless Chromium (``tests/test_ui_browser.py`` checks it):

- ``#/experiments/<id>`` opens the GenAI overview; ``?workflowType=machine_learning`` turns it
  into a redirect to the runs table that drops every other query parameter. So the URL names the
  runs tab itself: ``#/experiments/<id>/runs?workflowType=machine_learning``.
- The run table's URL parameters are only the search facets (``searchFilter``, ``orderByKey``,
  ``orderByAsc``, ``startTime``, ``lifecycleFilter``, ``modelVersionFilter``,
  ``datasetsFilter``). Everything else -- which metric, param and tag columns are shown,
  which parent runs are expanded -- is UI state kept in the browser's localStorage, per
  experiment; metric columns start hidden. ``orderByKey`` alone sorts by a column nobody sees.
- MLflow's own "share view" feature carries the UI state in the store: an experiment tag
  ``mlflow.sharedViewState.<key>`` holding the state as JSON, opened by
  ``?viewStateShareKey=<key>`` (and only when no facet is in the URL). ``adaptune ui`` writes
  that tag (idempotently: the key is a hash of the state) with the sort (objective, best first)
  and the columns, in this order: the objective, the other headline metrics, the searched
  hyperparameters, and the tags ``adaptune.kind`` (``search`` = the parent run, ``trial`` = a
  child) and ``adaptune.tasks_done`` (fewer than the stream's tasks = stopped early by ASHA).
  The page shows a "You're viewing a shared view" banner; the user's own changes then stay in
  their browser.
  Where the tag cannot be written the URL falls back to ``orderByKey``/``orderByAsc``.
- Sorted by anything but the start time, MLflow lists parent and child runs flat (it nests
  children under a collapsed parent only in start-time order, and the shared state may not carry
  ``runsExpanded``). Flat is what a search needs: every trial in objective order; the parent run,
  which has no objective value, is the last row.

``mlflow server`` runs with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` unless set: the job
runner (four more processes, for GenAI evaluation jobs) has nothing to do for a search.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from adaptune.search.stores import DEFAULT_TRACKING_URI, check_tracking_server, existing_store
from adaptune.search.tags import KIND_SEARCH, KIND_TAG, PARENT_TAG, SEARCHED_TAG, TASKS_DONE_TAG
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.metrics import HEADLINE_METRICS, RETAIN_HEADLINE_METRICS

SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # MLflow UI's experiment tags of shared views


@dataclass(frozen=True)
class SearchView:
    """What the printed URL shows: one experiment's runs, sorted by ``metric``."""

    experiment_id: str
    experiment_name: str
    metric: str
    mode: str
    parent_run_id: str | None
    params: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()


def _col(kind: str, key: str) -> str:
    """A run-table column id as MLflow's UI spells it: ``metrics.`stream_loss```."""
    return f"{kind}.`{key}`"


def view_state(view: SearchView) -> dict[str, Any]:
    """The run table's state for ``view``: sort by the objective, best first; its columns."""
    metrics = [view.metric, *(m for m in view.metrics if m != view.metric)]
    columns = [_col("metrics", m) for m in metrics]
    columns += [_col("params", p) for p in view.params]
    columns += [_col("tags", KIND_TAG), _col("tags", TASKS_DONE_TAG)]
    return {
        "orderByKey": _col("metrics", view.metric),
        "orderByAsc": view.mode == "min",
        "selectedColumns": columns,
        "columnOrder": columns,  # else metrics sort by name; the objective comes first
    }


def share_key(state: dict[str, Any]) -> str:
    """A stable key for ``state``: the same view reuses one experiment tag."""
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    return f"adaptune-{digest[:16]}"


def runs_url(base: str, experiment_id: str, **query: str) -> str:
    """The "Model training" runs table of one experiment, with extra query parameters."""
    params = urlencode({"workflowType": "machine_learning", **query}, quote_via=quote)
    return f"{base}/#/experiments/{experiment_id}/runs?{params}"


def sorted_url(base: str, view: SearchView) -> str:
    """Fallback without the shared view: sorted by the objective, its column left hidden."""
    return runs_url(
        base,
        view.experiment_id,
        orderByKey=_col("metrics", view.metric),
        orderByAsc="true" if view.mode == "min" else "false",
    )


def publish_view(client: Any, view: SearchView) -> str:
    """Store the view as an MLflow shared view state; returns its ``viewStateShareKey``."""
    state = view_state(view)
    key = share_key(state)
    client.set_experiment_tag(view.experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(state))
    return key


def _latest_search(client: Any, experiment_ids: list[str]) -> Any | None:
    """The most recent adaptune parent run among ``experiment_ids``."""
    if not experiment_ids:
        return None
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{KIND_TAG}` = '{KIND_SEARCH}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def find_view(
    client: Any, experiment_name: str | None, metric: str | None, mode: str | None
) -> SearchView | None:
    """The search to show: in ``experiment_name``, else the latest search in the store."""
    if experiment_name is not None:
        found = client.get_experiment_by_name(experiment_name)
        if found is None:
            return None
        experiments = [found]
    else:
        experiments = list(client.search_experiments())
    parent = _latest_search(client, [str(e.experiment_id) for e in experiments])
    if parent is None:
        if experiment_name is None:
            return None
        experiment_id, parent_params = str(experiments[0].experiment_id), {}
    else:
        experiment_id, parent_params = parent.info.experiment_id, parent.data.params
    name = next(e.name for e in experiments if str(e.experiment_id) == str(experiment_id))
    # a multi-objective search logs "a,b": the table sorts by the first
    metric = metric or parent_params.get("search.metric", "stream_loss").split(",")[0]
    mode = mode or parent_params.get("search.mode", "min").split(",")[0]
    params: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    if parent is not None:
        children = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
            order_by=["attributes.start_time DESC"],
            max_results=20,
        )
        params = tuple(sorted({p for c in children for p in c.data.params}))
        searched = parent.data.tags.get(SEARCHED_TAG)  # trials log fixed values too
        params = tuple(p for p in params if searched is None or p in searched.split(","))
        reported = {m for c in children for m in c.data.metrics}
        shown = (*HEADLINE_METRICS, *RETAIN_HEADLINE_METRICS)
        metrics = tuple(m for m in shown if m in reported)
    return SearchView(
        experiment_id=str(experiment_id),
        experiment_name=name,
        metric=metric,
        mode=mode,
        parent_run_id=parent.info.run_id if parent is not None else None,
        params=params,
        metrics=metrics,
    )


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port(host: str, port: int) -> None:
    """Fail before starting anything when ``host:port`` is taken (another server would answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); "
                "pick another port, or --port 0 for a free one"
            ) from None


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the MLflow server did not answer at {url} within {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop ``mlflow server`` and the uvicorn process it started (its own process group).

    SIGTERM, not SIGINT: uvicorn re-raises the signal it caught once it has shut down, and a
    re-raised SIGINT becomes a KeyboardInterrupt traceback in the server's asyncio loop.
    """
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _announce(view: SearchView | None, url: str, open_browser: bool) -> None:
    if view is not None:
        parent = f", parent run {view.parent_run_id}" if view.parent_run_id else ""
        print(f"experiment {view.experiment_name!r}: trials sorted by {view.metric} "
              f"({view.mode}){parent}", flush=True)
    print(f"MLflow UI: {url}", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)


def cmd_ui(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    experiment_name = metric = mode = None
    tracking_uri = args.tracking_uri
    if args.experiment:
        from adaptune.search.experiment import load_experiment

        exp = load_experiment(args.experiment)
        tracking_uri = tracking_uri or exp.tracking.tracking_uri
        experiment_name = exp.tracking.experiment_name or exp.name
        metric, mode = exp.search.primary_metric, exp.search.primary_mode
    tracking_uri = tracking_uri or DEFAULT_TRACKING_URI
    served = tracking_uri.startswith(("http://", "https://"))
    if served:  # that server already serves the UI: only the view and its URL are ours
        check_tracking_server(tracking_uri)
        base = tracking_uri.rstrip("/")
    else:
        tracking_uri = existing_store(tracking_uri)
        port = args.port if args.port else free_port(args.host)
        check_port(args.host, port)
        shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
        base = f"http://{shown_host}:{port}"

    client = MlflowClient(tracking_uri)
    view = find_view(client, experiment_name, metric, mode)
    if view is None and experiment_name is not None:
        raise ConfigError(f"{args.experiment}: no MLflow experiment named {experiment_name!r} yet")
    url = base
    if view is not None:
        try:
            url = runs_url(base, view.experiment_id, viewStateShareKey=publish_view(client, view))
        except Exception as err:  # noqa: BLE001 - a read-only store still gets a sorted table
            print(f"adaptune ui: could not store the table's view ({err}); columns stay hidden",
                  file=sys.stderr)
            url = sorted_url(base, view)
    if served:
        _announce(view, url, args.open)
        return 0

    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--host", args.host,
        "--port", str(port),
        "--workers", "1",
        # one line per request would bury the printed URL; errors are still logged
        "--uvicorn-opts", "--no-access-log",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # SIGTERM (e.g. from a test or a service manager) must stop the server too, not orphan it
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, _sigterm)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        wait_until_up(base, proc)
        _announce(view, url, args.open)
        print("Ctrl-C stops the server.", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as err:  # the server did not start: say so in one line
        print(f"adaptune ui: error: {err}", file=sys.stderr)
        return 1
    finally:
        stop(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ui = sub.add_parser(
        "ui",
        help="serve the MLflow UI for the tracking store (127.0.0.1); print the trials' URL",
        description="Serve the MLflow UI for the tracking store and print the URL of the "
        "search's trials, sorted by the objective, with its column shown.",
    )
    ui.add_argument("experiment", nargs="?",
                    help="experiment YAML: its store and experiment (default: the latest search "
                    "in runs/mlflow.db)")
    ui.add_argument("--tracking-uri", default=None,
                    help=f"MLflow store (default: the experiment's, else {DEFAULT_TRACKING_URI})")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000; 0 = a free one)")
    ui.add_argument("--open", action="store_true", help="also open the URL in a browser")
    ui.set_defaults(func=cmd_ui)
