"""Experience replay: a buffer of past blocks mixed into every batch.

Two buffers keep ``buffer_size`` blocks: a reservoir (a uniform sample of every block offered so
far, old and new alike) and a sliding window (the latest blocks, first in first out: what an
online stream rehearses when only the recent past matters).
"""

from __future__ import annotations

import torch
from adaptune.trainables.components.base import Component, TaskContext
from adaptune.trainables.config import ReplayConfig
from torch import Tensor


class ReservoirBuffer:
    """Algorithm R (Vitter 1985): after ``n`` offers each item is kept with probability ``k/n``.

    Blocks are stored as a ``(capacity, block_size)`` int tensor; randomness comes only from the
    generator passed in, so a run that saves and restores it replays the same blocks.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"`capacity >= 0` must hold, but got capacity={capacity}")
        self.capacity = capacity
        self.blocks: Tensor | None = None  # (n_kept, block_size)
        self.seen = 0  # items offered so far

    def __len__(self) -> int:
        return 0 if self.blocks is None else int(self.blocks.shape[0])

    def add(self, blocks: Tensor, generator: torch.Generator) -> None:
        """Offer every row of ``blocks`` (N, block_size) to the reservoir, in order."""
        if self.capacity == 0:
            self.seen += int(blocks.shape[0])
            return
        kept = [] if self.blocks is None else list(self.blocks.unbind(0))
        for row in blocks.to(torch.int32).unbind(0):
            self.seen += 1
            if len(kept) < self.capacity:
                kept.append(row.clone())
                continue
            j = int(torch.randint(0, self.seen, (1,), generator=generator))
            if j < self.capacity:
                kept[j] = row.clone()
        self.blocks = torch.stack(kept)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` blocks drawn uniformly with replacement: (n, block_size) int64."""
        if self.blocks is None or n == 0:
            raise ValueError("cannot sample from an empty buffer")
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.blocks[idx].long()

    def state_dict(self) -> dict[str, Tensor]:
        state = {"seen": torch.tensor(self.seen)}
        if self.blocks is not None:
            state["blocks"] = self.blocks
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.seen = int(state["seen"])
        self.blocks = state.get("blocks")


class WindowBuffer(ReservoirBuffer):
    """The latest ``capacity`` blocks offered, oldest first; draws nothing from the generator
    when it adds (sampling still does)."""

    def add(self, blocks: Tensor, generator: torch.Generator) -> None:
        """Append every row of ``blocks`` (N, block_size), dropping the oldest beyond capacity."""
        self.seen += int(blocks.shape[0])
        if self.capacity == 0:
            return
        new = blocks.to(torch.int32)
        kept = new if self.blocks is None else torch.cat([self.blocks, new])
        self.blocks = kept[-self.capacity :].clone()


BUFFERS: dict[str, type[ReservoirBuffer]] = {"reservoir": ReservoirBuffer, "window": WindowBuffer}


class Replay(Component):
    """Mixes ``replay_fraction`` of each batch from the buffer; offers it each task's blocks
    (in online mode: each update's chunk)."""

    def __init__(self, cfg: ReplayConfig) -> None:
        self.replay_fraction = cfg.replay_fraction
        self.buffer = BUFFERS[cfg.buffer_kind](cfg.buffer_size)

    def rows(self, ctx: TaskContext) -> int:
        """Blocks of each batch that come from the buffer (0 while it is empty); at least one
        block of every batch stays from the current task."""
        if len(self.buffer) == 0:
            return 0
        return min(ctx.batch_size - 1, round(self.replay_fraction * ctx.batch_size))

    def compose(self, batch: Tensor, ctx: TaskContext) -> Tensor:
        n = self.rows(ctx)
        if n == 0:
            return batch
        old = self.buffer.sample(n, ctx.generator).to(batch.device)
        return torch.cat([batch, old], dim=0)  # the rows so far, then n replayed

    def after_task(self, ctx: TaskContext) -> None:
        self.buffer.add(ctx.train_blocks, ctx.generator)

    def state_dict(self) -> dict[str, Tensor]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.buffer.load_state_dict(state)
