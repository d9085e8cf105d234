"""Update modes: which weights a run trains (``run.update``).

- ``full``: every weight.
- ``freeze``: the embeddings (token and learned position embeddings: every ``nn.Embedding``
  outside the transformer blocks) and the bottom ``freeze_layers`` blocks stay fixed. With tied
  input and output embeddings (GPT-2, the built ``tiny-gpt``) the output head is the same tensor
  and stays fixed with them.
- ``lora``: LoRA adapters (peft) on ``target_modules`` train; every base weight stays fixed.
  With ``lora_merge_each_task`` the adapter is merged into the weights at each task boundary and
  the next task trains a fresh one, so a run of T tasks ends with T - 1 merged adapters and
  the last task's live one.

The components see only the trainable parameters (``requires_grad``): EWC's Fisher and anchor
cover the adapter in LoRA mode. A merge happens before the components' ``after_task``, so
EWC anchors the fresh adapter where it starts (its ``lora_B`` at zero: the merged weights).

A LoRA checkpoint holds the adapters, not the base weights: :func:`save_adapters` writes
``adapter/`` (the live one) and ``merged/<k>/`` (the k-th merged one), each a peft adapter
folder; :func:`load_adapters` puts them back on the base the run started from.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from adaptune.trainables.config import RunConfig, UpdateConfig
from adaptune.trainables.errors import ConfigError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

ADAPTER_DIR = "adapter"  # the live adapter in a LoRA checkpoint
MERGED_DIR = "merged"  # merged/<k>/: the adapter merged into the weights after task k
_ADAPTER = "default"  # peft's adapter name
_MERGED_ATTR = "adaptune_merged_adapters"  # on a peft model: the merged adapters, in order
_WEIGHTS = "adapter_model.safetensors"  # peft's file names, so peft loads these folders too


def apply_update(model: nn.Module, cfg: UpdateConfig) -> nn.Module:
    """``model`` (freshly built or loaded) set up to train in ``cfg.mode``.

    Returns:
        ``model`` itself (``full``, ``freeze``) or a peft model wrapping it (``lora``).

    Raises:
        ConfigError: ``freeze_layers`` above the model's blocks, target modules the model lacks.
    """
    if cfg.mode == "freeze":
        _freeze(model, cfg.freeze_layers)
        return model
    if cfg.mode == "lora":
        return _wrap(model, lora_config(cfg))
    return model


def check_update(cfg: RunConfig, config: Any, tokenizer: Any) -> None:
    """Refuse, before training, an update mode the model cannot take: ``freeze_layers`` larger
    than its blocks, LoRA target modules it lacks (or an architecture without a peft default).

    Applies the mode to a weightless copy of the model (on the ``meta`` device).

    Args:
        cfg: the run.
        config: the model's transformers config, None for the built model.
        tokenizer: the run's tokenizer (sizes the built model).

    Raises:
        ConfigError: naming the ``run.update`` field, the rule and the valid values.
    """
    if cfg.update.mode == "full":
        return
    skeleton = _skeleton(cfg, config, tokenizer)
    if skeleton is not None:
        apply_update(skeleton, cfg.update)
        return
    layers = getattr(config, "num_hidden_layers", None)
    if cfg.update.mode == "freeze" and isinstance(layers, int):
        _check_freeze_layers(cfg.update.freeze_layers, layers)


def _skeleton(cfg: RunConfig, config: Any, tokenizer: Any) -> nn.Module | None:
    """The model without weights, or None where it cannot be built from its config alone."""
    import transformers
    from adaptune.trainables.model import TINY, build_model

    try:
        with torch.device("meta"):
            if cfg.model.name == TINY:
                return build_model(cfg.model, tokenizer)
            if config is None:
                return None
            return transformers.AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.model.trust_remote_code
            )
    except Exception:  # noqa: BLE001 - the check is then left to the run (same errors)
        return None


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the first ``nn.ModuleList`` whose length is the
    config's ``num_hidden_layers`` (GPT-2's ``transformer.h``, Llama's ``model.layers``).

    Raises:
        ConfigError: the model has no such list.
    """
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return module
    raise ConfigError(
        f"run.update.mode: `freeze` needs the model's transformer blocks (an nn.ModuleList of "
        f"num_hidden_layers={layers} modules), none found in {type(model).__name__}; "
        "valid values: full, lora"
    )


def _check_freeze_layers(n: int, layers: int) -> None:
    if n > layers:
        raise ConfigError(
            f"run.update.freeze_layers: must be <= the model's {layers} transformer blocks "
            f"(got {n})"
        )


def _freeze(model: nn.Module, n: int) -> None:
    blocks = transformer_blocks(model)
    _check_freeze_layers(n, len(blocks))
    inside = {id(m) for block in blocks for m in block.modules()}
    # every embedding below the blocks: a trainable position embedding would shift the input
    # of the frozen blocks as surely as a trainable token embedding
    frozen = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside]
    frozen += [model.get_input_embeddings(), *blocks[:n]]
    for module in frozen:
        module.requires_grad_(False)


# ---- LoRA --------------------------------------------------------------------------------------


def lora_config(cfg: UpdateConfig) -> Any:
    """The ``peft.LoraConfig`` of ``cfg`` (``lora_B`` starts at zero: a new adapter changes
    nothing until it trains)."""
    import peft

    return peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules else None,
        task_type="CAUSAL_LM",
    )


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (LoRA mode)."""
    import peft

    return isinstance(model, peft.PeftModel)


def merged_adapters(model: nn.Module) -> list[dict[str, Tensor]]:
    """The adapters already merged into ``model``'s weights, in merge order (CPU tensors)."""
    return list(model.__dict__.get(_MERGED_ATTR, []))


def merge_adapter(model: nn.Module) -> nn.Module:
    """Merge ``model``'s adapter into its weights; returns a new peft model with a fresh adapter
    (same configuration) on top, remembering the merged one for the checkpoint.

    ``model`` is consumed: its layers now belong to the returned model.
    """
    live = {k: v.detach().cpu().clone() for k, v in _adapter_state(model).items()}
    config = copy.deepcopy(model.peft_config[_ADAPTER])
    done = [*merged_adapters(model), live]
    training = model.training
    fresh = _wrap(model.merge_and_unload(), config)
    fresh.__dict__[_MERGED_ATTR] = done
    return fresh.train(training)


def save_adapters(model: nn.Module, path: Path) -> None:
    """Write ``path/adapter/`` (the live adapter) and ``path/merged/<k>/`` (the merged ones)."""
    config = model.peft_config[_ADAPTER]
    _write_adapter(path / ADAPTER_DIR, _adapter_state(model), config)
    for k, state in enumerate(merged_adapters(model), start=1):
        _write_adapter(path / MERGED_DIR / str(k), state, config)


def load_adapters(base: nn.Module, path: Path) -> nn.Module:
    """The model a LoRA checkpoint at ``path`` holds, rebuilt on ``base`` (the model the run
    started from): the merged adapters merged again in order, then the live adapter on top,
    trainable, its parameters in the order the run created them. The merges run where ``base``
    is: on the device the run merged on, they give the same weights bit for bit."""
    merged_dir = path / MERGED_DIR
    folders = sorted(merged_dir.iterdir(), key=lambda d: int(d.name)) if merged_dir.is_dir() else []
    model, done = base, []
    for folder in folders:
        wrapped = _wrap(model, _read_config(folder))
        done.append(_load_weights(wrapped, folder))
        model = wrapped.merge_and_unload()
    live = _wrap(model, _read_config(path / ADAPTER_DIR))
    _load_weights(live, path / ADAPTER_DIR)
    live.__dict__[_MERGED_ATTR] = done
    return live


def _wrap(model: nn.Module, config: Any) -> nn.Module:
    """``peft.get_peft_model``; its errors on the target modules become a :class:`ConfigError`."""
    import peft

    try:
        with _quiet_peft():
            return peft.get_peft_model(model, copy.deepcopy(config))
    except ValueError as err:
        names = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in model.named_modules()
                if type(m).__name__ in ("Linear", "Conv1D") and name
            }
        )
        text = (str(err).strip() or type(err).__name__).splitlines()[0].split(". ")[0]
        raise ConfigError(
            f"run.update.target_modules: {text}; valid values: names of the model's linear "
            f"layers, e.g. {', '.join(names[:12])}"
        ) from None


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft warns that it switches ``fan_in_fan_out`` on for GPT-2's ``Conv1D`` layers, which is
    exactly what they need; and it calls a transformers property transformers deprecates."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors, named as peft saves them. The base's embeddings are never among
    them: a run never resizes the vocabulary (peft's "auto" would look for the base's files)."""
    import peft

    state: dict[str, Tensor] = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    return state


def _write_adapter(folder: Path, state: dict[str, Tensor], config: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, folder / _WEIGHTS, metadata={"format": "pt"})
    config.save_pretrained(folder)


def _read_config(folder: Path) -> Any:
    import peft

    return peft.LoraConfig.from_pretrained(str(folder))


def _load_weights(model: nn.Module, folder: Path) -> dict[str, Tensor]:
    """Load a folder written by :func:`_write_adapter` into ``model``'s adapter, every tensor.

    Raises:
        RuntimeError: the folder's tensors do not match the adapter's.
    """
    import peft

    state = load_file(folder / _WEIGHTS)
    expected = set(_adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RuntimeError(
            f"{folder}: the adapter's tensors do not match the model's "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    peft.set_peft_model_state_dict(model, state)
    return state
