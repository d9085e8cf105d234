"""Errors a user can fix: raised before training, printed as one line, exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad experiment or run config: the message names the field, the rule and the value."""


class TrainingDivergedError(RuntimeError):
    """A NaN or infinite loss; the message names the task and step where it happened."""
