"""Replay: reservoir sampling (Algorithm R) and batch mixing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adaptune.trainables.components import TaskContext
from adaptune.trainables.components.replay import Replay, ReservoirBuffer
from adaptune.trainables.config import ReplayConfig
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare


def items(n: int, start: int = 0, width: int = 3) -> torch.Tensor:
    """``n`` distinct blocks: row i is ``[start + i] * width``."""
    return torch.arange(start, start + n).repeat_interleave(width).view(n, width)


@pytest.mark.parametrize(("capacity", "offered"), [(10, 3), (10, 10), (10, 25), (1, 7), (0, 5)])
def test_keeps_min_of_capacity_and_seen(capacity: int, offered: int) -> None:
    buf = ReservoirBuffer(capacity)
    gen = torch.Generator().manual_seed(0)
    buf.add(items(offered), gen)
    assert len(buf) == min(capacity, offered)
    assert buf.seen == offered
    buf.add(items(offered, start=100), gen)  # a second task
    assert len(buf) == min(capacity, 2 * offered)
    assert buf.seen == 2 * offered


def test_stored_rows_are_offered_rows_and_unique() -> None:
    buf = ReservoirBuffer(8)
    buf.add(items(30), torch.Generator().manual_seed(3))
    assert buf.blocks is not None and buf.blocks.shape == (8, 3)
    ids = buf.blocks[:, 0].tolist()
    assert len(set(ids)) == 8
    assert all(0 <= i < 30 for i in ids)
    assert torch.equal(buf.blocks, buf.blocks[:, :1].expand(-1, 3))  # rows kept intact


def test_under_capacity_keeps_everything_in_order() -> None:
    buf = ReservoirBuffer(10)
    buf.add(items(4), torch.Generator().manual_seed(0))
    assert buf.blocks is not None
    assert buf.blocks[:, 0].tolist() == [0, 1, 2, 3]


def test_negative_capacity_rejected() -> None:
    with pytest.raises(ValueError, match="capacity >= 0"):
        ReservoirBuffer(-1)


N_ITEMS, CAPACITY, REPEATS = 50, 10, 4000


class FirstComeBuffer(ReservoirBuffer):
    """Deliberately biased: keeps the first ``capacity`` items and ignores the rest."""

    def add(self, blocks: torch.Tensor, generator: torch.Generator) -> None:
        kept = [] if self.blocks is None else list(self.blocks.unbind(0))
        for row in blocks.unbind(0):
            self.seen += 1
            if len(kept) < self.capacity:
                kept.append(row.clone())
        self.blocks = torch.stack(kept)


def inclusion_counts(make: Callable[[int], ReservoirBuffer]) -> list[int]:
    """Offer items 0..49 (as two tasks of 20 and 30) to a capacity-10 buffer, REPEATS times with
    different generators; count how often each item ends up in the buffer."""
    counts = torch.zeros(N_ITEMS, dtype=torch.long)
    offered = items(N_ITEMS, width=1)
    for r in range(REPEATS):
        gen = torch.Generator().manual_seed(r)
        buf = make(CAPACITY)
        buf.add(offered[:20], gen)
        buf.add(offered[20:], gen)
        assert buf.blocks is not None
        counts[buf.blocks[:, 0].long()] += 1
    return counts.tolist()


def test_inclusion_probability_is_uniform() -> None:
    # Algorithm R: every item is kept with probability 10/50, i.e. 800 of 4000 times.
    counts = inclusion_counts(ReservoirBuffer)
    assert sum(counts) == CAPACITY * REPEATS
    result = chisquare(counts)  # against the uniform 800 per item
    assert result.pvalue > 1e-3, (result, counts)
    # and the test has teeth: a first-come buffer is rejected
    biased = inclusion_counts(FirstComeBuffer)
    assert sum(biased) == CAPACITY * REPEATS
    assert chisquare(biased).pvalue < 1e-6


class OffByOneBuffer(ReservoirBuffer):
    """Deliberately wrong: draws ``j`` from ``[0, seen - 1)`` instead of ``[0, seen)``."""

    def add(self, blocks: torch.Tensor, generator: torch.Generator) -> None:
        kept = [] if self.blocks is None else list(self.blocks.unbind(0))
        for row in blocks.unbind(0):
            self.seen += 1
            if len(kept) < self.capacity:
                kept.append(row.clone())
                continue
            j = int(torch.randint(0, self.seen - 1, (1,), generator=generator))
            if j < self.capacity:
                kept[j] = row.clone()
        self.blocks = torch.stack(kept)


def single_slot_counts(make: Callable[[int], ReservoirBuffer], repeats: int = 3000) -> list[int]:
    counts = [0, 0, 0]
    for r in range(repeats):
        buf = make(1)
        buf.add(items(3, width=1), torch.Generator().manual_seed(10_000 + r))
        assert buf.blocks is not None
        counts[int(buf.blocks[0, 0])] += 1
    return counts


def test_single_slot_reservoir_keeps_each_of_three_with_probability_one_third() -> None:
    # capacity 1, items 0, 1, 2: item 1 replaces with prob 1/2, item 2 with prob 1/3, so
    # P(0) = 1 * 1/2 * 2/3 = 1/3, P(1) = 1/2 * 2/3 = 1/3, P(2) = 1/3: 1000 each of 3000.
    counts = single_slot_counts(ReservoirBuffer)
    assert chisquare(counts).pvalue > 1e-3, counts
    # off by one: item 1 always replaces item 0, item 2 half the time -> (0, 1500, 1500)
    assert chisquare(single_slot_counts(OffByOneBuffer)).pvalue < 1e-6


def test_sample_draws_only_stored_rows() -> None:
    buf = ReservoirBuffer(5)
    gen = torch.Generator().manual_seed(0)
    buf.add(items(20), gen)
    assert buf.blocks is not None
    stored = {tuple(r) for r in buf.blocks.tolist()}
    drawn = buf.sample(500, gen)
    assert drawn.shape == (500, 3) and drawn.dtype == torch.long
    assert {tuple(r) for r in drawn.tolist()} == stored  # 500 draws hit all 5 rows


def test_sample_from_empty_buffer_raises() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="empty"):
        ReservoirBuffer(4).sample(2, gen)
    zero = ReservoirBuffer(0)
    zero.add(items(3), gen)
    assert len(zero) == 0 and zero.seen == 3
    with pytest.raises(ValueError):
        zero.sample(1, gen)


def _replay(buffer_size: int = 8, fraction: float = 0.25) -> Replay:
    return Replay(ReplayConfig(buffer_size=buffer_size, replay_fraction=fraction))


def _ctx(blocks: torch.Tensor, batch_size: int = 16, seed: int = 0) -> TaskContext:
    return TaskContext(
        model=torch.nn.Identity(),
        train_blocks=blocks,
        generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
        k=1,
        n_tasks=2,
        batch_size=batch_size,
        pretrained=False,
    )


@pytest.mark.parametrize(
    ("fraction", "batch", "expected"),
    [
        (0.25, 16, 4),  # round(4.0)
        (0.25, 10, 2),  # round(2.5) = 2 (round half to even)
        (0.3, 10, 3),  # round(3.0)
        (0.1, 4, 0),  # round(0.4)
        (0.5, 7, 4),  # round(3.5) = 4
        (0.9, 4, 3),  # round(3.6) = 4, capped at batch - 1 = 3: one current block stays
        (0.0, 16, 0),
    ],
)
def test_rows_taken_from_each_batch(fraction: float, batch: int, expected: int) -> None:
    replay = _replay(fraction=fraction)
    ctx = _ctx(items(5), batch_size=batch)
    assert replay.rows(ctx) == 0  # empty buffer
    replay.after_task(ctx)
    assert replay.rows(ctx) == expected
    assert expected == min(batch - 1, round(fraction * batch))


def test_after_task_offers_the_task_blocks_to_the_buffer() -> None:
    replay = _replay(buffer_size=4)
    ctx = _ctx(items(10, start=100))
    replay.after_task(ctx)
    assert replay.buffer.seen == 10 and len(replay.buffer) == 4
    # the same draws as the buffer alone with the same generator
    alone = ReservoirBuffer(4)
    alone.add(items(10, start=100), torch.Generator().manual_seed(0))
    assert alone.blocks is not None and replay.buffer.blocks is not None
    assert torch.equal(alone.blocks, replay.buffer.blocks)


def test_compose_appends_buffer_rows_to_current_batch() -> None:
    replay = _replay(buffer_size=4)
    ctx = _ctx(items(6, start=100), batch_size=16)
    current = items(12)
    assert torch.equal(replay.compose(current, ctx), current)  # empty buffer: unchanged
    replay.after_task(ctx)
    mixed = replay.compose(current, ctx)
    assert mixed.shape == (16, 3) and mixed.dtype == torch.long
    assert torch.equal(mixed[:12], current)
    assert all(100 <= int(i) < 106 for i in mixed[12:, 0])


def test_buffer_state_dict_round_trip_reproduces_future(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    buf = ReservoirBuffer(6)
    buf.add(items(15), gen)
    # through safetensors, as the checkpoint stores it
    save_file({k: v.contiguous() for k, v in buf.state_dict().items()}, tmp_path / "s.safetensors")
    restored = ReservoirBuffer(6)
    restored.load_state_dict(load_file(tmp_path / "s.safetensors"))
    assert restored.seen == 15 and len(restored) == 6
    state = gen.get_state()
    gen2 = torch.Generator()
    gen2.set_state(state)
    # same draws, and the same reservoir after more offers
    assert torch.equal(buf.sample(20, gen), restored.sample(20, gen2))
    buf.add(items(30, start=50), gen)
    restored.add(items(30, start=50), gen2)
    assert buf.blocks is not None and restored.blocks is not None
    assert torch.equal(buf.blocks, restored.blocks)
    assert buf.seen == restored.seen == 45
    assert torch.equal(buf.sample(20, gen), restored.sample(20, gen2))


def test_replay_state_dict_round_trip() -> None:
    replay = _replay(buffer_size=5)
    ctx = _ctx(items(12), seed=1)
    replay.after_task(ctx)
    restored = _replay(buffer_size=5)
    restored.load_state_dict(replay.state_dict())
    ctx2 = _ctx(items(12), seed=1)
    ctx2.generator.set_state(ctx.generator.get_state())
    assert restored.rows(ctx2) == replay.rows(ctx) == 4
    current = items(12, start=200)
    assert torch.equal(replay.compose(current, ctx), restored.compose(current, ctx2))


def test_empty_state_dict_round_trip() -> None:
    restored = ReservoirBuffer(3)
    restored.load_state_dict(ReservoirBuffer(3).state_dict())
    assert len(restored) == 0 and restored.seen == 0
