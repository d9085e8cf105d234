"""Starting Ray for a search: a local cluster shaped for the trials, or a running cluster.

A local cluster gets :data:`LOCAL_RAY_ENV` where the user has not set it, and the CPUs this
process may run on (:func:`local_cpu_count`). Connecting to ``host:port`` sends this machine's
Ray auth token where one exists. Meanwhile a thread imports what the driver needs next and
opens the MLflow store (:mod:`search.preload`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from adaptune.search.preload import NEEDED_AFTER_INIT, preload_thread
from adaptune.search.stores import sqlite_file

# The environment of a local cluster's processes, set where the user has not (each a Ray
# setting read from its RAY_ variable; a Ray that lacks one ignores it). Each makes Ray's own
# processes wake less often beside trials that use every core (docs/benchmarks.md, section 2):
# - Ray's log monitor looks for new log files on every pass, ten times a second, while a node
#   has fewer than 1,000 of them; with the threshold at 0 it looks every 0.5 s
#   (LOG_NAME_UPDATE_INTERVAL_S) and still reads the files it has ten times a second: a new
#   worker's first lines reach the console up to 0.5 s later.
# - Three of the raylet's 100-200 ms timers run once a second: the object manager's (pulls and
#   pushes between nodes: a local cluster has one node), the idle-worker reaper (idle workers
#   live up to 1 s longer) and the plasma-store GC check.
# - Ray starts its workers at nice 15 so that its own processes and the user's stay responsive
#   beside them; a search's workers run its trials, which would then lose the core to every
#   wake-up of Ray's processes, while a plain training script runs at nice 0: so do trials here
#   (RAY_worker_niceness=15 restores Ray's).
LOCAL_RAY_ENV = {
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "RAY_object_manager_timer_freq_ms": "1000",
    "RAY_kill_idle_workers_interval_ms": "1000",
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_worker_niceness": "0",
}


def start_ray(address: str | None, tracking_uri: str) -> bool:
    """Connect to the cluster at ``address``, or start a local one, unless Ray already runs.

    Args:
        address: a running cluster (``ray://`` or ``host:port``); None: a local cluster.
        tracking_uri: the MLflow store, opened while ``ray.init`` waits; one that the opening
            created is removed again when ``ray.init`` fails.

    Returns:
        True when this call started Ray (the caller shuts it down), False when it already ran.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs: dict[str, Any] = {}
    if address:
        _use_token_auth_if_available(address)
        kwargs["address"] = address
    else:
        kwargs |= {"num_cpus": local_cpu_count(), "include_dashboard": False}
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)  # inherited by the processes ray.init starts
    # the thread is joined before the driver imports anything itself
    new_paths = _new_sqlite_paths(tracking_uri)
    preload = preload_thread(NEEDED_AFTER_INIT, tracking_uri=tracking_uri)
    try:
        ray.init(**kwargs)
    except BaseException:
        preload.join()
        _remove_new_paths(new_paths)
        raise
    preload.join()
    return True


def local_cpu_count() -> int | None:
    """CPUs for a local Ray cluster where this process may run on fewer than Ray would count
    (``taskset``, a cpuset), else None (Ray counts them).

    Ray counts the machine's CPUs, or a container's cgroup CPU quota where one is smaller, but
    not the process's CPU affinity, so ``taskset -c 0-3 adaptune search`` on a 64-core machine
    would schedule 64 one-CPU trials on 4 cores, and start as many idle workers as it counts
    CPUs, each polling a little. The smaller of the two counts wins: a container limited to 2
    CPUs (``--cpus 2``) on a cpuset of 8 gets 2.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return allowed if allowed < _ray_cpu_count() else None


def _ray_cpu_count() -> int:
    """The CPUs ``ray.init()`` counts on this machine: the cgroup quota where one is set (Ray's
    own helper, private in Ray 2.60), else the machine's."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:  # moved in another Ray: count the machine's
        return os.cpu_count() or 1
    return int(get_num_cpus(override_docker_cpu_warning=True))


def _use_token_auth_if_available(address: str) -> None:
    """Send this machine's Ray auth token when connecting to an explicit address.

    Ray >= 2.59 turns token authentication on for clusters started here (``ray start --head``
    once ``~/.ray/auth_token`` exists), but ``ray.init(address="host:port")`` sends the token only
    in token mode, which it enables by itself for ``address=None/"auto"`` alone; otherwise the
    driver retries, then fails with ``InvalidAuthToken``. Setting ``RAY_AUTH_MODE=token`` after
    ``import ray`` is not enough (RayConfig is cached), so use Ray's own helper, which refreshes
    it. An explicit ``RAY_AUTH_MODE`` always wins.
    """
    if "RAY_AUTH_MODE" in os.environ or address.startswith("ray://"):
        return
    try:  # private in Ray 2.59-2.60; the same call ray.init() makes for address="auto"
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # older Ray: no token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _new_sqlite_paths(tracking_uri: str) -> list[Path]:
    """What opening a sqlite tracking store would create: the file and its missing parents,
    deepest first (removed again if Ray fails to start)."""
    path = sqlite_file(tracking_uri)
    if path is None:
        return []
    created = []
    while not path.exists():
        created.append(path)
        if path.parent == path:
            break
        path = path.parent
    return created


def _remove_new_paths(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()  # only if empty
            else:
                path.unlink()
