"""Where a hyperparameter lives in the nested run config, read and written by its flat name.

Every hyperparameter has one flat name (``lr``) and one path inside the run config
(``("optim", "lr")``, :data:`trainables.config.HYPERPARAMETERS`). The nested dicts that carry
those values (the YAML's ``run``, Ray Tune's trial config, a run config dumped to JSON) are
walked only here.

Example:
    >>> config = {"optim": {"lr": 1e-3}}
    >>> set_hp(config, "lr", 3e-4)
    >>> get_hp(config, "lr"), tune_key("lr")
    (0.0003, 'optim/lr')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaptune.trainables.config import HYPERPARAMETERS

_BY_TUNE_KEY = {"/".join(path): name for name, path in HYPERPARAMETERS.items()}


def get_path(data: Mapping[str, Any], path: Sequence[str]) -> Any:
    """``data[path[0]][path[1]]...``.

    Raises:
        KeyError: a part of ``path`` is missing.
    """
    node: Any = data
    for part in path:
        node = node[part]
    return node


def set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Set ``data[path[0]]...[path[-1]] = value`` in place, creating missing mappings on the way.

    Raises:
        TypeError: a part on the way holds something other than a mapping (the message names it).
    """
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TypeError(f"{part!r} is not a mapping")
    node[path[-1]] = value


def get_hp(config: Mapping[str, Any], name: str) -> Any:
    """The value of the hyperparameter ``name`` in a nested run config."""
    return get_path(config, HYPERPARAMETERS[name])


def set_hp(config: dict[str, Any], name: str, value: Any) -> None:
    """Set the hyperparameter ``name`` in a nested run config, in place."""
    set_path(config, HYPERPARAMETERS[name], value)


def tune_key(name: str) -> str:
    """Ray Tune's flattened key of the hyperparameter ``name`` (``lr`` -> ``optim/lr``)."""
    return "/".join(HYPERPARAMETERS[name])


def from_tune_key(key: str) -> str:
    """The hyperparameter name of a flattened Tune key (``optim/lr`` -> ``lr``); other keys
    come back unchanged."""
    return _BY_TUNE_KEY.get(key, key)
