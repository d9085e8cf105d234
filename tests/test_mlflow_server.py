"""A search tracked by a real ``mlflow server`` (sqlite backend, proxied artifacts) over HTTP:
runs, artifacts, the champion and its alias on the server; ``adaptune export`` and
``adaptune ui`` against it; and a tracking URI where no server answers, refused in one line."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from adaptune.search.stores import check_tracking_server
from adaptune.search.ui import free_port, stop, wait_until_up
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "adaptune.trial_id"

EXPERIMENT = tiny_experiment(
    "served",
    run={
        "stream": {
            "max_train_tokens": 4096,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "code", "builtin": "python_source"},
            ],
        },
    },
    space={"lr": {"loguniform": [1.0e-4, 2.0e-2]}},
    search={"num_samples": 2, "seed": 1},
)


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    return free_port("127.0.0.1")


def _cli(cwd: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptune.search.cli", *args], cwd=cwd, capture_output=True,
        text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": PYTHONPATH, **env},
    )


# -- no server ----------------------------------------------------------------------------------
class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_status() -> Iterator[Any]:
    """``serve(status)``: the URL of a local HTTP server answering every GET with ``status``."""
    servers: list[http.server.HTTPServer] = []

    def serve(status: int) -> str:
        handler = type("Handler", (_Status,), {"status": status})
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_no_server_at_the_tracking_uri_is_one_config_error(http_status) -> None:
    port = _closed_port()
    with pytest.raises(ConfigError) as err:
        check_tracking_server(f"http://127.0.0.1:{port}")
    assert str(err.value) == (
        f"tracking.tracking_uri: no MLflow server answers at http://127.0.0.1:{port} "
        f"(Connection refused); start it with 'mlflow server --host 127.0.0.1 --port {port} "
        "--backend-store-uri sqlite:///mlflow.db' or fix the URI"
    )
    with pytest.raises(ConfigError, match=r"at http://127\.0\.0\.1:\d+/mlflow \(HTTP 503 "):
        check_tracking_server(http_status(503) + "/mlflow")  # a proxy whose server is down
    with pytest.raises(ConfigError, match=r"at https://127\.0\.0\.1:\d+ \(") as err:
        check_tracking_server(f"https://user:secret@127.0.0.1:{port}")
    assert "secret" not in str(err.value)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ConfigError, match=r"\(no answer within 0\.5s\)"):
            check_tracking_server(uri, timeout=0.5)
    check_tracking_server(http_status(200))
    check_tracking_server(http_status(401))  # MLflow's authentication: a server is there
    check_tracking_server("sqlite:///nowhere/mlflow.db")  # not a server: nothing to ask
    check_tracking_server("file:///nowhere/mlruns")


@pytest.mark.slow
def test_search_with_no_server_at_the_tracking_uri_exits_2_before_ray(tmp_path: Path) -> None:
    """Needs ``check_tracking_server`` called by ``run_search`` before ``ray.init``."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    data = EXPERIMENT | {"tracking": {"tracking_uri": uri}}
    write_experiment(tmp_path / "exp.yaml", data)
    # without the check MLflow's client retries for minutes; here it fails fast instead
    proc = _cli(tmp_path, "search", "exp.yaml", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f"tracking.tracking_uri: no MLflow server answers at {uri}" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # refused before ray.init
    assert not (tmp_path / "runs").exists()  # and before anything was written


# -- a real server ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    url: str  # the tracking URI
    root: Path  # the server's folder: mlflow.db, artifacts/
    work: Path  # the search's working directory: exp.yaml, runs/ray
    out: str  # `adaptune search` output


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``mlflow server`` on a free port, and one finished search tracked by it."""
    root, work = tmp_path_factory.mktemp("server"), tmp_path_factory.mktemp("search")
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until_up(url, proc, timeout=180)
        write_experiment(work / "exp.yaml", EXPERIMENT | {"tracking": {"tracking_uri": url}})
        search = _cli(work, "search", "exp.yaml", timeout=600)
        assert search.returncode == 0, search.stderr[-5000:]
        yield Served(url, root, work, search.stdout)
    finally:
        stop(proc)
        log.close()


def _runs(client: Any) -> tuple[Any, list[Any]]:
    experiment = client.get_experiment_by_name("served")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    return parents[0], [r for r in runs if PARENT_TAG in r.data.tags]


@pytest.mark.slow
def test_search_logs_runs_artifacts_and_the_champion_to_the_server(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    assert f"MLflow:   {served.url}" in served.out
    assert "champion: models:/adaptune-served@champion (version 1" in served.out
    client = MlflowClient(served.url)
    parent, children = _runs(client)
    assert parent.info.status == "FINISHED"
    assert len(children) == EXPERIMENT["search"]["num_samples"]
    assert {r.data.tags[PARENT_TAG] for r in children} == {parent.info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)

    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"experiment.yaml", "trials.csv", "trials.md", "objective_per_trial.png"} <= (
        parent_artifacts
    )
    for child in children:
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"loss_matrix.png", "loss_matrix.json"} <= names  # the heatmap and its numbers
    # proxied: the files sit in the server's artifact folder, not beside the search
    assert len(list((served.root / "artifacts").rglob("loss_matrix.png"))) == len(children)

    version = client.get_model_version_by_alias("adaptune-served", "champion")
    assert version.version == "1"
    assert version.tags["adaptune.trial_id"] in {r.data.tags[TRIAL_TAG] for r in children}
    assert parent.data.tags["adaptune.champion_trial_id"] == version.tags["adaptune.trial_id"]
    # for models:/NAME@alias, MLflow 3.17's download_artifacts(tracking_uri=, registry_uri=)
    # still reaches the default store (./mlflow.db) on the way; the environment reaches all,
    # once no earlier test's mlflow.set_tracking_uri/set_registry_uri is in force
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", served.url)
    model = Path(mlflow.artifacts.download_artifacts(
        "models:/adaptune-served@champion", dst_path=str(served.work / "champion")
    ))
    assert (model / "MLmodel").is_file()
    assert list(model.rglob("*.safetensors"))  # the weights came back through the server


@pytest.mark.slow
def test_export_reads_the_search_from_the_server(served: Served) -> None:
    from adaptune.search.experiment import load_experiment
    from mlflow.tracking import MlflowClient

    by_name = _cli(served.work, "export", "served", "--tracking-uri", served.url, "-o", "a.yaml")
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    by_file = _cli(served.work, "export", "exp.yaml", "-o", "b.yaml")  # the YAML's store
    assert by_file.returncode == 0, by_file.stderr[-3000:]
    text = (served.work / "a.yaml").read_text()
    assert f"# MLflow {served.url}" in text
    assert text == (served.work / "b.yaml").read_text()
    exp = load_experiment(str(served.work / "a.yaml"))
    assert exp.space == {} and exp.name == "served-best"
    champion = MlflowClient(served.url).get_model_version_by_alias("adaptune-served", "champion")
    assert f"trial {champion.tags['adaptune.trial_id']} (champion)" in by_name.stdout


@pytest.mark.slow
def test_ui_prints_the_servers_url_without_starting_a_server(served: Served) -> None:
    """``adaptune ui`` on an http tracking URI: that server already serves the UI, so ui
    prints (``--open``: opens) the trials' URL on it and exits, starting nothing."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(served.url).get_experiment_by_name("served")
    proc = _cli(served.work, "ui", "exp.yaml", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = f"{served.url}/#/experiments/{experiment.experiment_id}/runs?workflowType="
    urls = [ln for ln in proc.stdout.splitlines() if ln.startswith("MLflow UI: ")]
    assert urls and urls[0].startswith(f"MLflow UI: {runs}machine_learning"), proc.stdout
