"""``adaptune ui``: serve the MLflow UI for the tracking store, on 127.0.0.1 by default.

MLflow 3's UI opens an experiment on its GenAI overview page; the URL printed here goes straight
to the "Model training" runs table (``workflowType=machine_learning``), sorted by the objective.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode

from trainables.errors import ConfigError


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///runs/mlflow.db`` absolute (against the working directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path.cwd() / uri[len(prefix) :]).resolve())
    return uri


def experiment_url(base: str, experiment_id: str, metric: str, mode: str) -> str:
    """The runs table of one MLflow experiment, sorted by ``metric`` (best first)."""
    query = urlencode(
        {
            "workflowType": "machine_learning",
            "orderByKey": f"metrics.`{metric}`",
            "orderByAsc": "true" if mode == "min" else "false",
        },
        quote_via=quote,
    )
    return f"{base}/#/experiments/{experiment_id}?{query}"


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the MLflow server did not answer at {url} within {timeout:.0f}s")


def cmd_ui(args: argparse.Namespace) -> int:
    import mlflow

    tracking_uri = args.tracking_uri
    url_path = ""
    if args.experiment:
        from search.experiment import load_experiment

        exp = load_experiment(args.experiment)
        tracking_uri = tracking_uri or exp.tracking.tracking_uri
        name = exp.tracking.experiment_name or exp.name
        metric, mode = exp.search.metric, exp.search.mode
    tracking_uri = resolve_tracking_uri(tracking_uri or "sqlite:///runs/mlflow.db")
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ConfigError(f"--tracking-uri: no MLflow store at {db}; run a search first")
    base = f"http://{args.host}:{args.port}"
    if args.experiment:
        found = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(name)
        if found is None:
            raise ConfigError(f"{args.experiment}: no MLflow experiment named {name!r} yet")
        url_path = experiment_url(base, found.experiment_id, metric, mode)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--host", args.host,
        "--port", str(args.port),
        "--workers", "1",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_until_up(base, proc)
        print(f"MLflow UI: {url_path or base}", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url_path or base)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ui = sub.add_parser("ui", help="serve the MLflow UI for the tracking store")
    ui.add_argument("experiment", nargs="?", help="experiment YAML: print the URL of its trials")
    ui.add_argument("--tracking-uri", default=None, help="default: the experiment's, or runs/")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--open", action="store_true", help="open the URL in a browser")
    ui.set_defaults(func=cmd_ui)
