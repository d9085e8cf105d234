"""The protocol every continual-learning component follows, and the context its hooks receive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TaskContext:
    """What the hooks of one task see; built by the loop once per task, never mutated.

    ``model`` and ``generator`` are the run's own objects: a component may read the model and
    draw from the generator, and every draw shifts the draws after it, so the loop calls the
    components in one fixed order (the registry's).
    """

    model: nn.Module  # the model being trained, on ``device``
    train_blocks: Tensor  # (N, T) this task's training blocks, on the CPU
    generator: torch.Generator  # the run's data generator: batch order, replay, Fisher subsets
    device: torch.device
    k: int  # 1-based task index
    n_tasks: int
    batch_size: int  # B: rows of every training batch, the components' rows included
    pretrained: bool  # the stream starts from a model that was trained before (not a fresh init)
    tokenizer: Any = None  # the run's tokenizer (special ids, decoding); None: unknown

    @property
    def knows_something(self) -> bool:
        """The model has learnt something worth keeping before this task."""
        return self.pretrained or self.k > 1


# a checkpoint's folder of component texts (Component.artifacts); search.records reads it
ARTIFACTS_DIR = "artifacts"


class Component:
    """One continual-learning method: no-op defaults; a component overrides what it needs.

    Per task the loop calls, over the active components in registry order::

        before_task(ctx)                  # teacher snapshot, self-replay samples
        rows(ctx)                         # once: batch rows it supplies; the loop draws fewer
        for each step:
            batch = compose(batch, ctx)   # (B - Σ rows, T) current rows -> ... -> (B, T)
            loss += penalty(ctx, batch, logits) or nothing
            optimizer.step(); after_step(ctx, optimizer)   # decoupled EWC pull
        after_task(ctx)                   # Fisher + anchor, buffer update
        metrics()                         # its numbers, merged into the task's report
        artifacts()                       # its texts, written into the task's checkpoint

    and saves ``state_dict()`` in every checkpoint under ``"<name>.<key>"``. Hooks return
    values and keep their own state; they change neither the context nor each other.

    Adding a component takes three pieces::

        # trainables/components/mine.py
        class Mine(Component):
            def __init__(self, cfg: MineConfig) -> None:
                self.mine_weight = cfg.mine_weight        # attributes take the config's names

            def penalty(self, ctx, batch, logits):
                return self.mine_weight * ...

        # trainables/config.py: its config model, and a field on ComponentsConfig
        class MineConfig(_Strict):
            mine_weight: float = Field(0.0, ge=0)         # 0 = off
        class ComponentsConfig(_Strict):
            ...
            mine: MineConfig = MineConfig()

        # trainables/components/__init__.py: one registry line
        "mine": (Mine, lambda c: c.mine_weight > 0),
    """

    def before_task(self, ctx: TaskContext) -> None:
        """Prepare for training on task ``ctx.k``."""

    def rows(self, ctx: TaskContext) -> int:
        """Rows of each batch this component adds in :meth:`compose` during this task."""
        return 0

    def compose(self, batch: Tensor, ctx: TaskContext) -> Tensor:
        """The batch (on the CPU) with this component's :meth:`rows` rows appended."""
        return batch

    def penalty(self, ctx: TaskContext, batch: Tensor, logits: Tensor) -> Tensor | None:
        """An extra loss term for ``batch`` (B, T) and its ``logits`` (B, T, V), or None."""
        return None

    def after_step(self, ctx: TaskContext, optimizer: torch.optim.Optimizer) -> None:
        """Change the weights right after ``optimizer.step()`` (its param groups hold the
        step's learning rate), e.g. a pull decoupled from the gradient."""

    def after_task(self, ctx: TaskContext) -> None:
        """Update the state after training on task ``ctx.k``, before evaluation."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the task just trained, added to its report (names unique to the
        component, e.g. prefixed by it)."""
        return {}

    def artifacts(self) -> dict[str, str]:
        """Texts about the task just trained, file name -> text; the checkpoint holds them as
        ``<ARTIFACTS_DIR>/<component name>/<file name>`` and the trackers log them to MLflow."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Everything an exact resume needs, as tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
