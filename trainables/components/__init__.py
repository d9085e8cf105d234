"""Continual-learning components, each switched off by its hyperparameter being 0.

Every component follows :class:`~adaptune.trainables.components.base.Component` and is listed
once in :data:`REGISTRY`; the training loop knows them only through that protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from adaptune.trainables.checkpoint import split_state
from adaptune.trainables.components.base import ARTIFACTS_DIR, Component, TaskContext
from adaptune.trainables.components.distill import Distillation
from adaptune.trainables.components.ewc import EWC
from adaptune.trainables.components.replay import Replay
from adaptune.trainables.components.self_replay import SelfReplay
from adaptune.trainables.config import ComponentsConfig
from torch import Tensor

__all__ = [
    "ARTIFACTS_DIR",
    "REGISTRY",
    "Component",
    "TaskContext",
    "build_components",
    "component_metrics",
    "load_states",
    "states",
]

# (class built from its config, whether that config switches it on)
Registration = tuple[Callable[[Any], Component], Callable[[Any], bool]]

# name (= its field of ComponentsConfig and its checkpoint key prefix) -> registration.
# The order is the order of every hook call, and it matters: replay's rows go into the batch
# the penalties see, and replay's reservoir draws from the generator before EWC's Fisher subset.
# Self-replay comes right after replay: the components that add rows come first, so a batch is
# [current rows, replayed rows, self-generated rows] and the penalties (EWC, distillation) see
# all of them; adding it last among the row suppliers leaves replay's draws where they were.
REGISTRY: dict[str, Registration] = {
    "replay": (Replay, lambda c: c.buffer_size > 0),
    "self_replay": (SelfReplay, lambda c: c.self_fraction > 0),
    "ewc": (EWC, lambda c: c.ewc_lambda > 0),
    "distill": (Distillation, lambda c: c.distill_alpha > 0),
}


def build_components(cfg: ComponentsConfig) -> dict[str, Component]:
    """The active components, in registry order, keyed by name."""
    built = {}
    for name, (cls, active) in REGISTRY.items():
        sub = getattr(cfg, name)
        if active(sub):
            built[name] = cls(sub)
    return built


def states(components: Mapping[str, Component]) -> dict[str, Tensor]:
    """Every component's state in one flat dict, keys ``"<name>.<key>"``."""
    return {
        f"{name}.{key}": value
        for name, comp in components.items()
        for key, value in comp.state_dict().items()
    }


def component_metrics(components: Mapping[str, Component]) -> dict[str, float]:
    """Every component's numbers about the task just trained, for the task's report."""
    return {k: v for comp in components.values() for k, v in comp.metrics().items()}


def load_states(components: Mapping[str, Component], state: dict[str, Tensor]) -> None:
    """Give each component back its part of a flat dict written by :func:`states`."""
    for name, comp in components.items():
        comp.load_state_dict(split_state(state, name))
