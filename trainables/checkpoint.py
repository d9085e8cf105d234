"""Task-boundary checkpoints a run resumes from exactly.

Layout of one checkpoint directory::

    model/               transformers save_pretrained (config.json, generation_config.json,
                         model.safetensors) + the tokenizer for generation (``serving_tokenizer``)
    state.safetensors    component state (replay buffer, EWC precision/anchor) and RNG states
    optimizer.pt         AdamW state, read back with ``torch.load(weights_only=True)``
    progress.json        tasks done, loss matrix, token counts, the run config

The distillation teacher needs no file: at a task boundary it is the model itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from adaptune.trainables.model import context_length, serving_tokenizer, set_generation_defaults
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass
class Progress:
    tasks_done: int = 0
    loss_matrix: list[list[float]] = field(default_factory=list)  # rows 0..tasks_done
    base_losses: list[float] = field(default_factory=list)  # pretrain domain, per row
    trained_tokens: int = 0  # cumulative, replayed tokens included
    config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Tensor],
    progress: Progress,
) -> Path:
    """Write one checkpoint (layout in the module docstring); returns ``path``.

    ``model/`` is ready to generate from a plain prompt: a pipeline built from it appends no
    end-of-text token to the prompt and stops inside the model's context (generation defaults
    from :func:`set_generation_defaults`). Neither touches the weights or the training ids.
    """
    path.mkdir(parents=True, exist_ok=True)
    set_generation_defaults(model, tokenizer)
    model.save_pretrained(path / "model", safe_serialization=True)
    serving_tokenizer(tokenizer, context_length(model.config)).save_pretrained(path / "model")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, path / "state.safetensors"
    )
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / "progress.json").write_text(json.dumps(progress.__dict__, indent=1))
    return path


def load_progress(path: Path) -> Progress:
    return Progress(**json.loads((path / "progress.json").read_text()))


def load_state(path: Path) -> dict[str, Tensor]:
    return load_file(path / "state.safetensors")


def load_optimizer_state(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return state


def split_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
