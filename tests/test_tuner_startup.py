"""What the search driver does around ``ray.init``: imports and the MLflow store in a thread
while Ray starts, and nothing left behind when Ray does not start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import pytest
import ray
from adaptune.search.experiment import Experiment, parse_experiment
from adaptune.search.local_ray import LOCAL_RAY_ENV, _new_sqlite_paths, local_cpu_count
from adaptune.search.preload import preload_modules
from adaptune.search.tuner import run_search
from conftest import tiny_experiment


def small_experiment(tmp_path: Path, db: Path) -> Experiment:
    """A tiny search with its Ray results under ``tmp_path / "ray"`` and its MLflow store at
    ``db``."""
    data = tiny_experiment(
        "startup",
        run={
            "model": {"n_positions": 32},
            "stream": {
                "max_eval_blocks": 2,
                "tasks": [
                    {"name": "docs", "builtin": "python_docs"},
                    {"name": "names", "builtin": "unicode_names"},
                ],
            },
        },
        search={"num_samples": 1},
        storage_path=str(tmp_path / "ray"),
        tracking={"tracking_uri": f"sqlite:///{db}"},
    )
    return parse_experiment(data, source="startup.yaml")


def test_preload_opens_a_real_mlflow_store_and_imports(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    preload_modules(("json", "no_such_module_anywhere"), tracking_uri=uri)  # errors ignored
    assert "json" in sys.modules
    assert (tmp_path / "new" / "mlflow.db").is_file()
    client = mlflow.MlflowClient(tracking_uri=uri)  # the store is usable
    assert client.get_experiment_by_name("Default") is not None


def test_new_sqlite_paths_lists_the_file_and_missing_parents(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "mlflow.db"
    assert _new_sqlite_paths(f"sqlite:///{db}") == [db, db.parent, db.parent.parent]
    assert _new_sqlite_paths("http://127.0.0.1:5000") == []
    assert _new_sqlite_paths("sqlite:///:memory:") == []


def test_a_failed_ray_init_leaves_no_mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray itself is not under test here: ray.init is made to fail to see what the search
    # leaves behind. The store thread opened the store meanwhile; it must be gone.
    exp = small_experiment(tmp_path, tmp_path / "track" / "mlflow.db")
    assert not ray.is_initialized()

    def refuse(**_: object) -> None:
        import time

        time.sleep(3)  # long enough for the store thread to have created the database
        raise ConnectionError("no cluster here")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConnectionError):
        run_search(exp)
    assert not (tmp_path / "track").exists()
    assert not (tmp_path / "ray").exists()


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity with at least 2 CPUs to restrict",
)
def test_a_local_cluster_gets_the_cpus_this_process_may_run_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `taskset -c 0 adaptune search ...`: Ray would count every CPU of the machine; the local
    # cluster must get only the one the process may use. ray.init is stopped after its
    # arguments are seen (Ray honouring num_cpus is Ray's business).
    exp = small_experiment(tmp_path, tmp_path / "mlflow.db")
    seen: list[dict[str, object]] = []

    def record(**kwargs: object) -> None:
        seen.append(kwargs)
        raise ConnectionError("stop here")

    monkeypatch.setattr(ray, "init", record)
    allowed = os.sched_getaffinity(0)
    assert local_cpu_count() is None or local_cpu_count() == len(allowed)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert local_cpu_count() == 1
        with pytest.raises(ConnectionError):
            run_search(exp)
    finally:
        os.sched_setaffinity(0, allowed)
    assert seen and seen[0]["num_cpus"] == 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_a_cgroup_quota_smaller_than_the_affinity_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # A container run with `--cpus 2` on a cpuset of 8 CPUs of a 64-core machine: Ray's own
    # count (the quota, 2) must stand, not the 8 CPUs of the affinity. The machine's facts are
    # faked (this machine has none of them); the count comes from Ray's real helper.
    import multiprocessing

    import ray._private.utils as ray_utils

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(ray_utils, "_get_docker_cpus", lambda *a, **k: 2.0)
    assert ray_utils.get_num_cpus() == 2
    assert local_cpu_count() is None  # Ray's count, 2, is the smaller: let Ray count
    monkeypatch.setattr(ray_utils, "_get_docker_cpus", lambda *a, **k: 16.0)
    assert local_cpu_count() == 8  # the affinity is the smaller
    monkeypatch.setattr(ray_utils, "_get_docker_cpus", lambda *a, **k: None)
    assert local_cpu_count() == 8  # no quota: 8 of the machine's 64


def test_a_local_cluster_gets_adaptunes_environment_unless_the_user_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ray.init starts the local cluster's processes with the driver's environment: what
    # LOCAL_RAY_ENV holds must be there when it is called, and a value the user exported wins.
    # ray.init is stopped after the environment is seen.
    exp = small_experiment(tmp_path, tmp_path / "mlflow.db")
    seen: list[dict[str, str | None]] = []

    def record(**kwargs: object) -> None:
        seen.append({k: os.environ.get(k) for k in LOCAL_RAY_ENV})
        raise ConnectionError("stop here")

    monkeypatch.setattr(ray, "init", record)
    for key in LOCAL_RAY_ENV:
        monkeypatch.setenv(key, "")  # restored (absent) at teardown
        monkeypatch.delenv(key)
    with pytest.raises(ConnectionError):
        run_search(exp)
    assert seen[0] == LOCAL_RAY_ENV
    for key in LOCAL_RAY_ENV:
        monkeypatch.setenv(key, "1000")
    with pytest.raises(ConnectionError):
        run_search(exp)
    assert seen[1] == dict.fromkeys(LOCAL_RAY_ENV, "1000")
