"""What a search directory (``<storage_path>/<name>``) holds, and whether a search may start there.

A search directory holds Ray Tune's state (``tuner.pkl``, ``experiment_state-*.json``, the
searcher's snapshot, one folder per trial with its last task checkpoint), the Optuna study
(``optuna.db`` when local) and :data:`SEARCH_FILE`, written by ``adaptune search`` when the search
starts and again when it ends::

    {"name": "quickstart", "state": "running" | "finished", "experiment_hash": "<sha256>",
     "parent_run_id": "<MLflow run id>", "tracking_uri": "sqlite:///...", ...}

A directory is:

- ``new``: absent or empty; a search may start there;
- ``interrupted``: Ray can restore it (``Tuner.can_restore``: it holds ``tuner.pkl``) and the
  search did not finish (driver killed, machine rebooted, Ctrl-C): ``--resume`` continues it;
- ``finished``: the search ran to its end (summary logged, champion registered or none);
- ``unknown``: other files; nothing adaptune can start or resume there.

Paths are local directories or URIs (``s3://...``), read through ``pyarrow.fs`` as Ray does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from adaptune.search.lock import LOCK_FILES
from adaptune.trainables.errors import ConfigError

SEARCH_FILE = "adaptune-search.json"
SearchState = Literal["new", "interrupted", "finished", "unknown"]


@dataclass(frozen=True)
class SearchDir:
    location: str  # absolute local path or URI
    state: SearchState
    info: dict[str, Any] = field(default_factory=dict)  # SEARCH_FILE's content, {} when absent


def _fs(location: str) -> tuple[Any, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location)  # type: ignore[no-any-return]


def inspect_search_dir(location: str) -> SearchDir:
    """Classify ``location`` (see the module docstring); reads nothing but the directory."""
    import pyarrow.fs
    from ray.tune import Tuner

    try:
        fs, path = _fs(location)
        entries = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError) as err:  # unknown scheme, unreachable bucket, no permission
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ConfigError(f"storage_path: cannot read {location}: {first}") from None
    entries = [e for e in entries if e.base_name not in LOCK_FILES]  # the driver's lock
    if not entries:
        return SearchDir(location, "new")
    info = read_search_info(location)
    if info.get("state") == "finished":
        return SearchDir(location, "finished", info)
    if Tuner.can_restore(location):
        return SearchDir(location, "interrupted", info)
    return SearchDir(location, "unknown", info)


def read_search_info(location: str) -> dict[str, Any]:
    """:data:`SEARCH_FILE` in ``location`` as a dict ({} when absent or unreadable)."""
    import pyarrow.fs

    fs, path = _fs(location)
    target = f"{path}/{SEARCH_FILE}"
    if fs.get_file_info(target).type != pyarrow.fs.FileType.File:
        return {}
    try:
        with fs.open_input_stream(target) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_search_info(location: str, **changes: Any) -> dict[str, Any]:
    """Update :data:`SEARCH_FILE` in ``location`` with ``changes`` (creating both if needed)."""
    fs, path = _fs(location)
    info = read_search_info(location) | changes | {"updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{SEARCH_FILE}") as f:
        f.write((json.dumps(info, indent=1) + "\n").encode("utf-8"))
    return info


def check_search_dir(found: SearchDir, *, name: str, resume: bool, experiment_hash: str) -> None:
    """Refuse to start (or resume) a search where that cannot be right.

    Raises:
        ConfigError: one line saying what ``found`` holds and naming ``--resume``/``--name``.
    """
    where = found.location
    if found.state == "finished":
        if resume:
            raise ConfigError(
                f"--resume: the search {name!r} in {where} already finished; nothing to resume; "
                "pass --name NEW_NAME to start another"
            )
        raise ConfigError(
            f"name: {where} already holds a finished search named {name!r}; pass --name "
            "NEW_NAME to start another (--resume only continues an interrupted search)"
        )
    if found.state == "unknown":
        raise ConfigError(
            f"name: {where} holds files but no search Ray can resume (no tuner.pkl); "
            "pass --name NEW_NAME or remove that directory"
        )
    if not resume:
        if found.state == "interrupted":
            raise ConfigError(
                f"name: {where} holds an interrupted search named {name!r}; continue it with "
                "--resume, or pass --name NEW_NAME to start another"
            )
        return
    if found.state == "new":
        raise ConfigError(
            f"--resume: no search named {name!r} to resume in {where}; "
            "run without --resume to start it"
        )
    if not found.info.get("parent_run_id"):
        raise ConfigError(
            f"--resume: {where} has no {SEARCH_FILE} (the search's MLflow parent run); "
            "it was not started by this version of adaptune; pass --name NEW_NAME to start another"
        )
    if found.info.get("experiment_hash") != experiment_hash:
        raise ConfigError(
            f"--resume: this experiment differs from the one the search {name!r} started with "
            "(another file or other --set values); resume with the same ones, or pass "
            "--name NEW_NAME to start another"
        )
