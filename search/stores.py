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


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """For an ``http(s)://`` tracking URI, check that a server answers there; others pass.

    Asks what an MLflow client asks first, ``GET <uri>/api/2.0/mlflow/experiments/search``. Any
    HTTP answer but a 5xx (a proxy whose MLflow server is down) counts as a server: 401/403 are
    MLflow's own authentication, which the client reports in its own words.

    Raises:
        ConfigError: one line: nothing listens, the host is unknown, no answer within
            ``timeout`` seconds, or a 5xx.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no password
    url = f"{shown.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        cause = f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError) as err:  # refused, unknown host, timed out
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        cause = str(reason)
        if isinstance(reason, TimeoutError):
            cause = f"no answer within {timeout:g}s"
        elif isinstance(reason, OSError) and reason.strerror:
            cause = reason.strerror
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    raise ConfigError(
        f"tracking.tracking_uri: no MLflow server answers at {shown} ({cause}); start it with "
        f"'mlflow server --host {host} --port {port} --backend-store-uri sqlite:///mlflow.db' "
        "or fix the URI"
    )
