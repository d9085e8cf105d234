"""A real two-node Ray cluster on this machine, driven by ``adaptune search --address``.

``ray start --head`` on loopback and a second ``ray start --address`` worker node with its own
raylet and resources (one CPU each), as a user starts a cluster by hand. Token authentication is
set up the way Ray >= 2.59 does it: the head turns it on because a token file exists, the worker
is told ``RAY_AUTH_MODE=token``, and the drivers (``adaptune search --address HOST:PORT``, and one
connecting with ``auto`` that lists the nodes) are told nothing. The search's ``storage_path`` is
a ``file://`` URI, which goes to Ray (and pyarrow) as given, while the Optuna study stays on the
driver's disk. Two trials at a time with one CPU each must land on both nodes; the MLflow child
runs, written by the driver alone, say where (tag ``adaptune.node_id``).

Only the processes this test starts are stopped (never ``ray stop``: other Ray sessions may run
on the machine): everything whose command line names the cluster's own Ray temp dir
(``RAY_TMPDIR``), and their children.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from adaptune.search.checks import check_search
from adaptune.search.experiment import parse_experiment
from adaptune.search.locations import optuna_storage_file, search_location
from adaptune.search.resume import SEARCH_FILE
from adaptune.search.tags import NODE_ID_TAG, PARENT_TAG, TRIAL_TAG
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

RAY = str(Path(sys.executable).with_name("ray"))
NAME = "cluster"
EXPERIMENT = tiny_experiment(
    NAME,
    run={
        "stream": {
            "max_train_tokens": 2048,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "code", "builtin": "python_source"},
            ],
        },
    },
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, command line) for every process we can read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the (comm)
        found[int(entry.name)] = (ppid, cmdline)
    return found


def _cluster_pids(marker: str) -> set[int]:
    """Processes whose command line names ``marker``, and all their descendants (Ray renames
    its workers ``ray::IDLE`` etc., so they are found through their raylet)."""
    procs = _processes()
    pids = {pid for pid, (_, cmd) in procs.items() if any(marker in a for a in cmd)}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in pids} - pids
        pids |= children
        grew = bool(children)
    pids.discard(os.getpid())
    return pids


def _stop_cluster(marker: str) -> None:
    """SIGTERM this cluster's processes, SIGKILL what is left after a grace period."""
    pids = _cluster_pids(marker)
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
            if not pids:
                return
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _raylet_node_ids(marker: str) -> dict[str, str]:
    """node id -> "head" or "worker", from the command lines of this cluster's raylets."""
    nodes = {}
    for _, cmd in _processes().values():
        if not cmd or not cmd[0].endswith("/raylet") or not any(marker in a for a in cmd):
            continue
        args = dict(a[2:].split("=", 1) for a in cmd[1:] if a.startswith("--") and "=" in a)
        nodes[args["node_id"]] = "head" if "--head" in cmd else "worker"
    return nodes


@dataclass
class Cluster:
    address: str  # host:port of the head's GCS
    env: dict[str, str]  # for drivers: the token file, no RAY_AUTH_MODE
    nodes: dict[str, str]  # node id -> "head" / "worker"


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [RAY, "start", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"ray start {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


# A driver on the head that connects with `address="auto"` the way `adaptune search --address
# auto` does, and lists the cluster's nodes.
_LIST_NODES = """
import json, ray
from adaptune.search.local_ray import _use_token_auth_if_available
_use_token_auth_if_available("auto")
ray.init(address="auto", log_to_driver=False)
print(json.dumps({n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}))
"""


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[Cluster]:
    # Ray's temp dir (default /tmp/ray) holds this cluster's sessions and `ray_current_cluster`
    # (what `auto` finds); unix socket paths under it must stay short, so not under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="adt-", dir="/tmp")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env |= {
        "RAY_TMPDIR": ray_tmp,  # instead of /tmp: other Ray sessions may run on this machine
        "RAY_AUTH_TOKEN_PATH": str(token),  # instead of ~/.ray/auth_token
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    try:
        # the head finds the token and turns token authentication on by itself
        _ray_start(
            ["--head", f"--port={port}", "--include-dashboard=false",
             f"--dashboard-port={_free_port()}", *common],
            env,
        )
        # a joining node must be told to send it
        _ray_start(
            [f"--address={address}", '--resources={"adaptune_worker": 1}', *common],
            env | {"RAY_AUTH_MODE": "token"},
        )
        nodes = _raylet_node_ids(ray_tmp)
        assert sorted(nodes.values()) == ["head", "worker"], nodes
        listed = subprocess.run(
            [sys.executable, "-c", _LIST_NODES],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
        assert listed.returncode == 0, listed.stderr[-4000:]
        alive = json.loads(listed.stdout.strip().splitlines()[-1])
        assert set(alive) == set(nodes), (alive, nodes)
        assert "adaptune_worker" in alive[next(n for n, k in nodes.items() if k == "worker")]
        yield Cluster(address=address, env=env, nodes=nodes)
    finally:
        _stop_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_search_on_a_two_node_cluster(two_node_cluster: Cluster, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # "shared storage": both nodes see this machine's disk
    exp = EXPERIMENT | {"storage_path": shared.as_uri()}
    write_experiment(tmp_path / "exp.yaml", exp)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "adaptune.search.cli", "search", "exp.yaml",
         "--address", two_node_cluster.address],
        cwd=tmp_path, env=two_node_cluster.env, capture_output=True, text=True, timeout=600,
    )
    took = time.perf_counter() - start
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert f"champion: models:/adaptune-{NAME}@champion" in proc.stdout
    assert "Connecting to existing Ray cluster" in proc.stderr + proc.stdout

    # MLflow, written only by the driver: one parent, four finished children
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags[TRIAL_TAG] for r in children}) == 4

    # the trials ran on both nodes, and only on this cluster's nodes
    where = {r.data.tags[TRIAL_TAG]: r.data.tags.get(NODE_ID_TAG) for r in children}
    assert set(where.values()) == set(two_node_cluster.nodes), (where, two_node_cluster.nodes)

    # the champion: registered, its alias resolves to a version from a finished trial
    version = client.get_model_version_by_alias(f"adaptune-{NAME}", "champion")
    assert version.tags["adaptune.trial_id"] in where

    # results went to the storage URI; the Optuna study stays on the driver's disk
    info = json.loads((shared / NAME / SEARCH_FILE).read_text())
    assert info["state"] == "finished"
    trial_dirs = sorted((shared / NAME).glob("trial-*"))
    assert len(trial_dirs) == 4 and all(any(d.glob("checkpoint_*")) for d in trial_dirs)
    assert (tmp_path / "runs" / "optuna" / f"{NAME}.db").is_file()
    per_node = {kind: sum(two_node_cluster.nodes[n] == kind for n in where.values())
                for kind in ("head", "worker")}
    print(f"search on 2 nodes: {took:.0f}s; trials per node: {per_node}")


def test_storage_uri_goes_to_ray_as_given_and_optuna_stays_local(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(EXPERIMENT | {"storage_path": "s3://bucket/prefix/"})
    assert search_location(exp) == f"s3://bucket/prefix/{NAME}"
    assert optuna_storage_file(exp) == tmp_path / "runs" / "optuna" / f"{NAME}.db"
    exp = parse_experiment(EXPERIMENT | {"storage_path": "shared"})
    assert search_location(exp) == str(tmp_path / "shared" / NAME)
    assert optuna_storage_file(exp) == tmp_path / "shared" / NAME / "optuna.db"


def test_storage_that_cannot_be_read_is_refused_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = parse_experiment(EXPERIMENT | {"storage_path": "nosuchfs://bucket/prefix"})
    with pytest.raises(ConfigError) as err:
        check_search(exp)
    assert str(err.value).startswith(f"storage_path: cannot read nosuchfs://bucket/prefix/{NAME}: ")
    assert "\n" not in str(err.value)
