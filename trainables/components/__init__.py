"""Continual-learning components, each switched off by its hyperparameter being 0.

Each one needs two or three hooks and keeps its own state (``state_dict``/``load_state_dict``
for checkpoints): ``Replay.mix`` builds batches, ``EWC.penalty`` and ``Distillation.penalty``
return a loss term, ``after_task``/``before_task`` update their state at task boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptune.trainables.components.distill import Distillation
from adaptune.trainables.components.ewc import EWC
from adaptune.trainables.components.replay import Replay
from adaptune.trainables.config import ComponentsConfig


@dataclass(frozen=True)
class Components:
    replay: Replay | None
    ewc: EWC | None
    distill: Distillation | None

    def active(self) -> list[str]:
        return [name for name in REGISTRY if getattr(self, name) is not None]


# name -> (class, the hyperparameter that switches it off at 0)
REGISTRY: dict[str, tuple[type, str]] = {
    "replay": (Replay, "buffer_size"),
    "ewc": (EWC, "ewc_lambda"),
    "distill": (Distillation, "distill_alpha"),
}


def build_components(cfg: ComponentsConfig) -> Components:
    built = {}
    for name, (cls, switch) in REGISTRY.items():
        sub = getattr(cfg, name)
        built[name] = cls(sub) if getattr(sub, switch) > 0 else None
    return Components(**built)
