"""A run's checkpoint at a task boundary: :func:`_checkpoint` writes the weights, tokenizer,
optimizer, the components' state and both RNGs; on resume ``run._start`` loads the weights and
:func:`_restore` puts back the rest, so the run continues exactly where the checkpoint was taken."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from adaptune.trainables.checkpoint import (
    Progress,
    load_optimizer_state,
    load_state,
    save_checkpoint,
    split_state,
)
from adaptune.trainables.components import ARTIFACTS_DIR, Component, states
from adaptune.trainables.config import RunConfig
from adaptune.trainables.schedule import set_optimizer_values
from torch import nn

if TYPE_CHECKING:  # run imports this module
    from adaptune.trainables.run import Prepared


def _restore(
    path: Path,
    cfg: RunConfig,
    comps: dict[str, Component],
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> None:
    """Components, optimizer and both RNGs as the checkpoint at ``path`` left them, with
    ``cfg``'s settings: the checkpoint may come from another trial (a PBT exploit) or an
    earlier task of a schedule, and its optimizer state carries that run's lr."""
    state = load_state(path)
    for name, comp in comps.items():
        part = split_state(state, name)
        if part:  # one that was off when the checkpoint was written starts afresh
            comp.load_state_dict(part)
    opt.load_state_dict(load_optimizer_state(path))  # puts back the writer's lr, weight_decay
    set_optimizer_values(opt, cfg)  # so the current config's are written over them
    torch.set_rng_state(state["rng.torch"])
    gen.set_state(state["rng.data"])


def _checkpoint(
    path: Path,
    prep: Prepared,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    comps: dict[str, Component],
    gen: torch.Generator,
    progress: Progress,
) -> Path:
    """Everything ``run._start`` and :func:`_restore` need to continue exactly from here."""
    state = states(comps)
    state["rng.torch"] = torch.get_rng_state()
    state["rng.data"] = gen.get_state()
    save_checkpoint(
        path, model=model, tokenizer=prep.tokenizer, optimizer=opt, state=state, progress=progress
    )
    for name, comp in comps.items():  # texts about the task; a resume does not read them
        for file, text in comp.artifacts().items():
            (path / ARTIFACTS_DIR / name).mkdir(parents=True, exist_ok=True)
            (path / ARTIFACTS_DIR / name / file).write_text(text, encoding="utf-8")
    return path
