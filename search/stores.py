"""Where the MLflow store is: the tracking URI rules every command shares.

Kept free of heavy imports (no MLflow, no Ray) so that ``adaptune ui`` and ``adaptune export``
can check a store before loading either.
"""

from __future__ import annotations

from pathlib import Path

from adaptune.trainables.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
_SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` tracking URI (as written, maybe relative);
    None for other stores and for in-memory sqlite."""
    if not uri.startswith(_SQLITE) or uri[len(_SQLITE) :] in ("", ":memory:"):
        return None
    return Path(uri[len(_SQLITE) :])


def resolve_tracking_uri(uri: str, *, create: bool = True) -> str:
    """Make a relative ``sqlite:///path`` absolute (against the cwd) and, with ``create``,
    create its directory."""
    path = sqlite_file(uri)
    if path is None:
        return uri
    path = path if path.is_absolute() else Path.cwd() / path
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE}{path}"


def existing_store(uri: str) -> str:
    """``uri`` resolved, for commands that read a store: a sqlite file that is not there is a
    :class:`ConfigError` (``MlflowClient`` would create an empty store in its place)."""
    resolved = resolve_tracking_uri(uri, create=False)
    db = sqlite_file(resolved)
    if db is not None and not db.is_file():
        raise ConfigError(f"--tracking-uri: no MLflow store at {db}; run a search first")
    return resolved
