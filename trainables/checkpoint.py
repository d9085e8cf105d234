"""Task-boundary checkpoints a run resumes from exactly.

Layout of one checkpoint directory::

    model/               transformers save_pretrained (config.json, generation_config.json,
                         model.safetensors) + the tokenizer for generation (``serving_tokenizer``)
    adapter/             instead of model/ in LoRA mode: the live adapter (peft's
                         adapter_config.json, adapter_model.safetensors) + the serving tokenizer
    merged/<k>/          LoRA with lora_merge_each_task: the adapter merged after task k
    state.safetensors    component state (replay buffer, EWC precision/anchor) and RNG states
    optimizer.pt         AdamW state, read back with ``torch.load(weights_only=True)``
    progress.json        tasks done, loss matrix, token counts, the run config, the per-task
                         history of values and trials
    artifacts/<name>/    texts a component wrote about the task (self_replay/samples.txt); a
                         resume does not read them

The distillation teacher needs no file: at a task boundary it is the model itself. A LoRA
checkpoint holds no base weights: the run rebuilds its base (``run.base_model``) and puts the
adapters back on it; :func:`materialize_model` does the same for serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from adaptune.trainables.model import context_length, serving_tokenizer, set_generation_defaults
from adaptune.trainables.update import ADAPTER_DIR, is_lora, save_adapters
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass
class Progress:
    tasks_done: int = 0
    loss_matrix: list[list[float]] = field(default_factory=list)  # rows 0..tasks_done
    base_losses: list[float] = field(default_factory=list)  # pretrain domain, per row
    # retain domains, per row: one loss per domain (absent from files written without them)
    retain_losses: list[list[float]] = field(default_factory=list)
    trained_tokens: int = 0  # cumulative, replayed tokens included
    config: dict[str, Any] = field(default_factory=dict)  # the config of the last task trained
    # one entry per task trained, {"task": k, "trial": id or None, "hp": {name: value}}
    # (trainables.schedule); a resumed checkpoint's entries come along: a PBT clone's lineage
    history: list[dict[str, Any]] = field(default_factory=list)


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

    ``model/`` is ready to generate from a plain prompt (:func:`save_serving_model`). A peft
    model (LoRA mode) writes its adapters instead (``adapter/``, ``merged/<k>/``).
    """
    path.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        save_adapters(model, path)
        serving_tokenizer(tokenizer, context_length(model.config)).save_pretrained(
            path / ADAPTER_DIR
        )
    else:
        save_serving_model(model, tokenizer, path / "model")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, path / "state.safetensors"
    )
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / "progress.json").write_text(json.dumps(progress.__dict__, indent=1))
    return path


def save_serving_model(model: nn.Module, tokenizer: Any, dest: Path) -> Path:
    """Save ``model`` and its serving tokenizer into ``dest``, ready to generate from a plain
    prompt: a pipeline built from it appends no end-of-text token to the prompt and stops inside
    the model's context (generation defaults from :func:`set_generation_defaults`). Neither
    touches the weights or the training ids."""
    set_generation_defaults(model, tokenizer)
    model.save_pretrained(dest, safe_serialization=True)
    serving_tokenizer(tokenizer, context_length(model.config)).save_pretrained(dest)
    return dest


def materialize_model(ckpt_dir: Path, dest: Path) -> Path:
    """A plain transformers model folder of the checkpoint at ``ckpt_dir``: its ``model/``
    where it has one, else (LoRA) the run's base rebuilt from the run config in
    ``progress.json``, every merged adapter merged again in order, the live adapter merged on
    top, saved with the serving tokenizer into ``dest``.

    Returns:
        The folder to load with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    if (ckpt_dir / "model").is_dir():
        return ckpt_dir / "model"
    from adaptune.trainables.config import parse_run_config
    from adaptune.trainables.data import build_task
    from adaptune.trainables.model import load_tokenizer
    from adaptune.trainables.run import Prepared, base_model
    from adaptune.trainables.update import load_adapters

    cfg = parse_run_config(load_progress(ckpt_dir).config)
    tokenizer = load_tokenizer(cfg.model)
    pretrain = cfg.model.pretrain  # its domain rebuilds the cached base if the cache is gone
    domain = (
        None
        if pretrain is None
        else build_task(pretrain.domain, cfg.stream, tokenizer, "run.model.pretrain.domain")
    )
    with torch.random.fork_rng(devices=[]):  # the base is built from the run's seed
        base = base_model(Prepared(cfg, tokenizer, [], domain), torch.device("cpu"))
    model = load_adapters(base, ckpt_dir).merge_and_unload()
    return save_serving_model(model, tokenizer, dest)


def load_progress(path: Path) -> Progress:
    return Progress(**json.loads((path / "progress.json").read_text()))


def load_state(path: Path) -> dict[str, Tensor]:
    return load_file(path / "state.safetensors")


def load_optimizer_state(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return state


def split_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
