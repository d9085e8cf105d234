"""One driver per search: :class:`SearchLock` held by another live process (OS lock and heartbeat
modes), taken over from a SIGKILLed one, cleaned up on release; and ``adaptune search`` refusing
to run (or ``--resume``) a search whose driver is running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from adaptune.search.lock import HEARTBEAT_FILE, LOCK_FILE, MODE_ENV, SearchLock
from adaptune.search.resume import SEARCH_FILE
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# Takes the lock, says so on stdout, then holds it until killed.
HOLDER = """
import sys, time
from adaptune.search.lock import SearchLock
SearchLock(sys.argv[1], mode=sys.argv[2], timeout=float(sys.argv[3]), interval=0.1, settle=0.1,
           command="holder --test").acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def hold() -> Iterator[Any]:
    """``hold(location, mode, timeout)``: a live process holding the lock on ``location``."""
    procs: list[subprocess.Popen[str]] = []

    def start(location: Path, mode: str = "flock", timeout: float = 60.0) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(location), mode, str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=ENV,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "held\n", proc.stderr
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def _refusal(location: Path, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as err:
        SearchLock(str(location), settle=0.1, **kwargs).acquire()
    message = str(err.value)
    assert "\n" not in message
    return message


def _sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_live_holder_in_another_process_is_refused_by_pid_and_host(tmp_path, hold) -> None:
    folder = tmp_path / "runs" / "ray" / "s"
    proc = hold(folder)
    message = _refusal(folder)
    assert f"{folder}: another adaptune search is running here: pid {proc.pid} on {HOST}" in message
    assert "(holder --test)" in message  # its command
    assert f"`kill {proc.pid}` on {HOST}" in message and "continue with --resume" in message
    record = json.loads((folder / LOCK_FILE).read_text())
    assert record["pid"] == proc.pid and record["host"] == HOST
    _refusal(folder)  # refusing leaves the holder's lock and record alone
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == proc.pid


def test_a_sigkilled_holder_never_blocks(tmp_path, hold) -> None:
    folder = tmp_path / "s"
    proc = hold(folder)
    _sigkill(proc)
    assert (folder / LOCK_FILE).exists()  # left behind, its record naming the dead driver
    start = time.monotonic()
    with SearchLock(str(folder)) as lock:
        assert time.monotonic() - start < 2.0  # at once: the kernel dropped the dead one's lock
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.record["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()


def test_heartbeat_holder_refuses_while_alive_and_is_taken_over_when_stale(
    tmp_path, hold
) -> None:
    folder, timeout = tmp_path / "s", 1.0
    proc = hold(folder, "heartbeat", timeout)
    time.sleep(2 * timeout)  # longer than the timeout: only the refreshes keep it held
    message = _refusal(folder, mode="heartbeat", timeout=timeout)
    assert f"pid {proc.pid} on {HOST}" in message and f"`kill {proc.pid}` on {HOST}" in message
    assert "last heartbeat 0s ago (dead after 1s)" in message

    _sigkill(proc)
    assert f"pid {proc.pid}" in _refusal(folder, mode="heartbeat", timeout=timeout)  # not yet
    time.sleep(timeout + 0.5)
    with SearchLock(str(folder), mode="heartbeat", timeout=timeout, settle=0.1) as lock:
        record = json.loads((folder / HEARTBEAT_FILE).read_text())
        assert record["pid"] == os.getpid() and record["token"] == lock.record["token"]
    assert not (folder / HEARTBEAT_FILE).exists()


def test_heartbeat_holder_in_this_process_refreshes_and_refuses_another(tmp_path) -> None:
    folder = tmp_path / "s"
    with SearchLock(str(folder), mode="heartbeat", timeout=1.0, interval=0.1, settle=0.1):
        first = json.loads((folder / HEARTBEAT_FILE).read_text())["beat"]
        time.sleep(1.5)
        assert json.loads((folder / HEARTBEAT_FILE).read_text())["beat"] > first
        assert f"pid {os.getpid()}" in _refusal(folder, mode="heartbeat", timeout=1.0)


@pytest.mark.parametrize("mode", ["flock", "heartbeat"])
def test_release_removes_the_record_and_the_folders_it_created(tmp_path, mode) -> None:
    folder = tmp_path / "runs" / "ray" / "s"
    lock = SearchLock(str(folder), mode=mode, interval=0.1, settle=0.1)
    with lock:
        assert sorted(os.listdir(folder)) == [LOCK_FILE if mode == "flock" else HEARTBEAT_FILE]
    assert not lock.record
    assert not (tmp_path / "runs").exists()  # nothing left where nothing was
    lock.release()  # a second release does nothing

    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")
    with SearchLock(str(folder), mode=mode, interval=0.1, settle=0.1):
        (folder / "trial_0").mkdir()  # the search wrote into it: it stays
    assert sorted(os.listdir(folder)) == ["trial_0", "tuner.pkl"]
    with SearchLock(str(folder), mode=mode, settle=0.1):  # free again
        pass


def test_mode_follows_the_location_and_the_environment(tmp_path, monkeypatch) -> None:
    assert SearchLock(str(tmp_path)).mode == "flock"
    assert SearchLock("s3://bucket/runs/ray/s").mode == "heartbeat"
    assert SearchLock("gs://bucket/runs/ray/s/").location == "gs://bucket/runs/ray/s"
    monkeypatch.setenv(MODE_ENV, "heartbeat")  # e.g. NFS mounted without locks
    assert SearchLock(str(tmp_path)).mode == "heartbeat"
    monkeypatch.setenv(MODE_ENV, "nfs")
    with pytest.raises(ConfigError, match=f"{MODE_ENV}: must be 'heartbeat', or 'flock'"):
        SearchLock(str(tmp_path))
    with pytest.raises(ConfigError, match="got 'flock' for s3://bucket/s"):
        SearchLock("s3://bucket/s", mode="flock")


# -- the command line: a second driver on a running search --------------------------------------
EXPERIMENT = tiny_experiment(
    "locked",
    run={"stream": {"max_train_tokens": 16384}},
    space={"lr": {"loguniform": [1.0e-4, 2.0e-2]}, "buffer_size": {"choice": [0, 32]}},
    search={"num_samples": 4, "seed": 5},
)


def _tree(root: int) -> set[int]:
    """``root``, its process group and every descendant (Ray's processes, started by it)."""
    procs: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    found = {root} | {pid for pid, (_, pgid) in procs.items() if pgid == root}
    while more := {pid for pid, (ppid, _) in procs.items() if ppid in found} - found:
        found |= more
    return found


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_for_trials(tmp_path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the search's MLflow store shows a running trial (a child run)."""
    from mlflow.tracking import MlflowClient

    db, deadline = tmp_path / "runs" / "mlflow.db", time.monotonic() + 240
    started = tmp_path / "runs" / "ray" / "locked" / SEARCH_FILE  # written after the parent run
    client = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the search ended early:\n{log.read_text()[-3000:]}"
        if started.exists():  # the store exists: this process must not create its tables too
            try:
                client = client or MlflowClient(f"sqlite:///{db}")
                experiment = client.get_experiment_by_name("locked")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                if any("mlflow.parentRunId" in r.data.tags for r in runs):
                    return
            except Exception:  # noqa: BLE001 - the store is being created
                pass
        time.sleep(0.5)
    raise AssertionError(f"no trial started within 240 s:\n{log.read_text()[-3000:]}")


def _second_driver(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "adaptune.search.cli", "search", "exp.yaml", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it did not refuse: it is running the search as well
        pids = _tree(proc.pid)
        _signal(pids, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"`adaptune search {' '.join(args)}` ran instead of refusing:\n"
                             f"{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_a_second_driver_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    write_experiment(tmp_path / "exp.yaml", EXPERIMENT)
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "adaptune.search.cli", "search", "exp.yaml"],
            cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    folder = tmp_path / "runs" / "ray" / "locked"
    try:
        _wait_for_trials(tmp_path, first, log)
        # frozen, not ended: a stopped driver still holds its lock, and leaves the CPUs to
        # the second drivers
        _signal(_tree(first.pid), signal.SIGSTOP)
        for args in ((), ("--resume",)):
            second = _second_driver(tmp_path, *args)
            assert second.returncode == 2, (args, second.stderr[-3000:])
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, (args, second.stderr[-3000:])
            assert f"another adaptune search is running here: pid {first.pid} on {HOST}" in lines[0]
            assert f"`kill {first.pid}` on {HOST}" in lines[0] and "--resume" in lines[0]
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == first.pid
    finally:
        pids = _tree(first.pid)
        _signal(pids, signal.SIGKILL)
        first.wait(timeout=30)
    # a SIGKILLed driver leaves its lock file, never its lock (``--resume`` after a kill:
    # tests/test_search_resume.py)
    start = time.monotonic()
    with SearchLock(str(folder)):
        assert time.monotonic() - start < 2.0
