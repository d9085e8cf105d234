"""A real two-node Ray cluster on this machine, driven by ``adaptune search --address``.

``ray start --head`` on loopback and a second ``ray start --address`` worker node with its own
raylet and resources (one CPU each), as a user starts a cluster by hand; both use token
authentication the way Ray >= 2.59 sets it up: the head turns it on because a token file exists,
the worker is told ``RAY_AUTH_MODE=token``, and the driver (``adaptune search --address``) is told
nothing. The search's ``storage_path`` is a ``file://`` URI, which goes to Ray (and pyarrow) as
given, while the Optuna study stays local. Two trials at a time with one CPU each must land on
both nodes; the MLflow child runs say where (tag ``adaptune.node_id``).

Only the processes this test starts are stopped (never ``ray stop``: other Ray sessions may run
on the machine): everything whose command line names the cluster's own ``--temp-dir``, and their
children.
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
import yaml
from mlflow.tracking import MlflowClient

from search.resume import SEARCH_FILE
from search.tracking import NODE_ID_TAG, PARENT_TAG, TRIAL_TAG

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

RAY = str(Path(sys.executable).with_name("ray"))
NAME = "cluster"
EXPERIMENT = {
    "name": NAME,
    "run": {
        "model": {"name": "tiny-gpt", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64},
        "stream": {
            "block_size": 32,
            "max_train_tokens": 2048,
            "max_eval_blocks": 4,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "code", "builtin": "python_source"},
            ],
        },
        "optim": {"batch_size": 8, "schedule": "constant"},
        "eval_batch_size": 8,
    },
    "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}},
    "search": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "scheduler": "fifo"},
    "resources": {"cpus_per_trial": 1},
}


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
    for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 2.0)):
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


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[Cluster]:
    # unix socket paths must stay short (< 108 bytes): not under pytest's tmp_path
    temp_dir = tempfile.mkdtemp(prefix="adt-", dir="/tmp")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env |= {
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
        f"--temp-dir={temp_dir}",
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
        nodes = _raylet_node_ids(temp_dir)
        assert sorted(nodes.values()) == ["head", "worker"], nodes
        yield Cluster(address=address, env=env, nodes=nodes)
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_search_on_a_two_node_cluster(two_node_cluster: Cluster, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # "shared storage": both nodes see this machine's disk
    exp = EXPERIMENT | {"storage_path": shared.as_uri()}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", "search", "exp.yaml",
         "--address", two_node_cluster.address],
        cwd=tmp_path, env=two_node_cluster.env, capture_output=True, text=True, timeout=600,
    )
    took = time.perf_counter() - start
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
    assert (tmp_path / "runs" / "optuna" / f"{NAME}.db").is_file()
    per_node = {kind: sum(two_node_cluster.nodes[n] == kind for n in where.values())
                for kind in ("head", "worker")}
    print(f"search on 2 nodes: {took:.0f}s; trials per node: {per_node}")
