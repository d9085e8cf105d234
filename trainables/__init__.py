"""One continual-learning run: model, task stream, replay/EWC/distillation, metrics, checkpoints.

Never imports ``search``: the experiment layer composes this package, not the other way round.
``prepare``, ``run_stream`` and ``Prepared`` (which need torch and transformers) load on first
use, so the commands that only read an experiment or an MLflow store start without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adaptune.trainables.config import HYPERPARAMETERS, RunConfig, parse_run_config
from adaptune.trainables.errors import ConfigError, TrainingDivergedError

if TYPE_CHECKING:
    from adaptune.trainables.run import Prepared, prepare, run_stream

_FROM_RUN = ("Prepared", "prepare", "run_stream")

__all__ = [
    "HYPERPARAMETERS",
    "ConfigError",
    "Prepared",
    "RunConfig",
    "TrainingDivergedError",
    "parse_run_config",
    "prepare",
    "run_stream",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_RUN:
        value = getattr(importlib.import_module("adaptune.trainables.run"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trainables' has no attribute {name!r}")
