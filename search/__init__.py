"""The experiment layer: schema, Ray Tune search, MLflow tracking, export, command line.

The Python API (:mod:`adaptune.search.api`) is importable from here:
``from adaptune.search import train, search``. It loads on first use, so that importing the
command line (``adaptune --help``) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunResult", "SearchResult", "search", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from adaptune.search import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
