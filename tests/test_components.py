"""The component protocol: registry, off-switches, hook order, checkpoint state, a loop that
names no component."""

from __future__ import annotations

import inspect
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from adaptune.trainables import TrainingDivergedError, parse_run_config, prepare, run_stream
from adaptune.trainables.checkpoint import load_state
from adaptune.trainables.components import (
    REGISTRY,
    Component,
    TaskContext,
    build_components,
    load_states,
    states,
)
from adaptune.trainables.config import ComponentsConfig, RunConfig
from conftest import tiny_experiment
from pydantic import BaseModel
from torch import Tensor

MARKER = 5  # the token id the toy component fills its rows with

EVENTS: list[tuple[str, int]] = []


class ToyConfig(BaseModel):
    toy_rows: int = 0  # 0 = off
    poison: bool = False  # return a NaN penalty


class ToyComponents(ComponentsConfig):
    toy: ToyConfig = ToyConfig()


class Toy(Component):
    """Appends ``toy_rows`` marker rows to every batch and counts what it sees."""

    def __init__(self, cfg: ToyConfig) -> None:
        self.toy_rows = cfg.toy_rows
        self.poison = cfg.poison
        self.steps = 0
        self.tasks: list[int] = []
        self.batch_rows: list[int] = []

    def before_task(self, ctx: TaskContext) -> None:
        EVENTS.append(("before_task", ctx.k))

    def rows(self, ctx: TaskContext) -> int:
        EVENTS.append(("rows", ctx.k))
        return self.toy_rows

    def compose(self, batch: Tensor, ctx: TaskContext) -> Tensor:
        EVENTS.append(("compose", ctx.k))
        marker = torch.full((self.toy_rows, batch.shape[1]), MARKER, dtype=batch.dtype)
        return torch.cat([batch, marker], dim=0)

    def penalty(self, ctx: TaskContext, batch: Tensor, logits: Tensor) -> Tensor | None:
        EVENTS.append(("penalty", ctx.k))
        assert logits.shape[:2] == batch.shape  # (B, T, V) for (B, T)
        assert bool((batch[-self.toy_rows :] == MARKER).all())  # its rows come last
        self.batch_rows.append(int(batch.shape[0]))
        self.steps += 1
        return torch.tensor(float("nan")) if self.poison else None

    def after_task(self, ctx: TaskContext) -> None:
        EVENTS.append(("after_task", ctx.k))
        self.tasks.append(ctx.k)

    def state_dict(self) -> dict[str, Tensor]:
        return {"steps": torch.tensor(self.steps), "tasks": torch.tensor(self.tasks)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        EVENTS.append(("load_state_dict", int(state["steps"])))
        self.steps = int(state["steps"])
        self.tasks = state["tasks"].tolist()


BUILT: list[Toy] = []


def _build_toy(cfg: ToyConfig) -> Toy:
    BUILT.append(Toy(cfg))
    return BUILT[-1]


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy registered last, the way a new component is: one registry line."""
    monkeypatch.setitem(REGISTRY, "toy", (_build_toy, lambda c: c.toy_rows > 0))
    EVENTS.clear()
    BUILT.clear()


def _run_config(**toy: Any) -> RunConfig:
    run = tiny_experiment(
        run={
            "seed": 0,
            "stream": {
                "tasks": [
                    {"name": "docs", "builtin": "python_docs"},
                    {"name": "code", "builtin": "python_source"},
                ],
            },
            "hardware": {"threads": 1},
        }
    )["run"]
    cfg = parse_run_config(run)
    components = ToyComponents(
        replay={"buffer_size": 64, "replay_fraction": 0.25}, toy=ToyConfig(**toy)
    )
    return cfg.model_copy(update={"components": components})


def _task_events(k: int, steps: int) -> list[tuple[str, int]]:
    return [
        ("before_task", k),
        ("rows", k),
        *[e for _ in range(steps) for e in (("compose", k), ("penalty", k))],
        ("after_task", k),
    ]


def test_a_registered_component_gets_its_hooks_and_its_state_resumes(
    toy_registered: None, tmp_path: Path
) -> None:
    prep = prepare(_run_config(toy_rows=2))
    n_train = [t.train.shape[0] for t in prep.tasks]
    saved = tmp_path / "after-task-1"
    first: list[dict[str, Any]] = []

    def keep(metrics: dict[str, Any], ckpt: Path) -> None:
        first.append(metrics)
        shutil.copytree(ckpt, saved)

    run_stream(prep, report=keep, stop_after=1)
    # task 1: the replay buffer is empty, so only the toy's 2 of 8 rows are not drawn
    steps1 = math.ceil(n_train[0] / 6)
    assert first[0]["steps"] == steps1
    assert EVENTS == _task_events(1, steps1)
    assert BUILT[0].batch_rows == [8] * steps1
    state = load_state(saved)
    assert int(state["toy.steps"]) == steps1 and state["toy.tasks"].tolist() == [1]
    assert "replay.seen" in state  # the others keep their "<name>.<key>" keys

    EVENTS.clear()
    resumed: list[tuple[dict[str, Any], dict[str, Tensor]]] = []
    run_stream(prep, report=lambda m, c: resumed.append((m, load_state(c))), resume_from=saved)
    # task 2: replay takes round(0.25 * 8) = 2 rows and the toy 2, so 4 current rows a step
    steps2 = math.ceil(n_train[1] / 4)
    assert EVENTS == [("load_state_dict", steps1), *_task_events(2, steps2)]
    toy = BUILT[-1]
    assert toy is not BUILT[0] and toy.batch_rows == [8] * steps2
    metrics, state = resumed[0]
    assert metrics["task_index"] == 2 and metrics["steps"] == steps2
    assert int(state["toy.steps"]) == steps1 + steps2
    assert state["toy.tasks"].tolist() == [1, 2]


def test_a_component_penalty_is_added_to_the_loss(toy_registered: None) -> None:
    with pytest.raises(TrainingDivergedError, match=r"task 1 \('docs'\), step 1/"):
        run_stream(prepare(_run_config(toy_rows=1, poison=True)), report=lambda m, c: None)


def test_run_stream_names_no_component() -> None:
    source = inspect.getsource(run_stream).lower()
    names = [*REGISTRY, "replay", "ewc", "distill", "teacher", "fisher", "buffer", "_alpha"]
    assert [n for n in names if n in source] == []


def test_off_switches_and_registry_order() -> None:
    assert build_components(ComponentsConfig()) == {}
    cfg = ComponentsConfig.model_validate(
        {
            "distill": {"distill_alpha": 0.5, "temperature": 3.0},
            "ewc": {"ewc_lambda": 1e-9},
            "replay": {"buffer_size": 1, "replay_fraction": 0.1},
        }
    )
    comps: dict[str, Any] = build_components(cfg)
    assert list(comps) == ["replay", "ewc", "distill"]  # the registry's order, not the config's
    # attributes carry the config's names
    assert comps["replay"].replay_fraction == 0.1
    assert comps["ewc"].ewc_lambda == 1e-9
    assert comps["distill"].distill_alpha == 0.5 and comps["distill"].temperature == 3.0
    for off in ({"replay": {"buffer_size": 0}}, {"ewc": {"ewc_lambda": 0.0}}):
        assert build_components(ComponentsConfig.model_validate(off)) == {}
    only_ewc = build_components(ComponentsConfig.model_validate({"ewc": {"ewc_lambda": 2.0}}))
    assert list(only_ewc) == ["ewc"]


def test_states_are_prefixed_by_name_and_load_back() -> None:
    cfg = ComponentsConfig.model_validate(
        {"replay": {"buffer_size": 4}, "ewc": {"ewc_lambda": 1.0}, "distill": {"distill_alpha": 1}}
    )
    comps: dict[str, Any] = build_components(cfg)
    comps["replay"].buffer.add(torch.arange(12).view(6, 2), torch.Generator().manual_seed(0))
    comps["ewc"].consolidate({"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])})
    flat = states(comps)
    assert set(flat) == {
        "replay.seen",
        "replay.blocks",
        "ewc.precision.w",
        "ewc.anchor.w",
        "ewc.constant",
    }
    fresh: dict[str, Any] = build_components(cfg)
    load_states(fresh, flat)
    assert fresh["replay"].buffer.seen == 6
    assert torch.equal(fresh["replay"].buffer.blocks, comps["replay"].buffer.blocks)
    assert torch.equal(fresh["ewc"].precision["w"], torch.tensor([2.0]))
